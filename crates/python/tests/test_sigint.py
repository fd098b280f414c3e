"""Ctrl-C during a long call ends it with KeyboardInterrupt, not a crash."""

import os
import signal
import subprocess
import sys
import textwrap


def test_sigint_stops_generation_cleanly():
    code = textwrap.dedent("""
        import os, signal, threading, time
        import safety_layers as sl
        # A shell's background job starts with SIGINT ignored, and Python then installs no
        # handler; a terminal's Ctrl-C, which this stands for, finds Python's own.
        signal.signal(signal.SIGINT, signal.default_int_handler)
        m = sl.Model.load("smollm2-135m-instruct")
        threading.Timer(1.0, lambda: os.kill(os.getpid(), signal.SIGINT)).start()
        t = time.time()
        try:
            m.generate(["Write a long story about the sea."] * 64, max_new_tokens=64,
                       batch_size=1, ignore_eos=True, progress=False)
            print("finished")
        except KeyboardInterrupt:
            print(f"interrupted after {time.time() - t:.1f} s")
        print(m.generate(["Hi"], max_new_tokens=2, progress=False))
    """)
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=300, env=os.environ)
    assert p.returncode == 0, p.stderr
    assert "interrupted after" in p.stdout, p.stdout + p.stderr
    assert "finished" not in p.stdout
