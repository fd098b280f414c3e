#!/usr/bin/env python3
"""Benchmark 5: peak RSS of `safety-layers cosine` on SmolLM2-135M-Instruct (the 200 prompts,
500 pairs per type) against the size of its f32 weights (the safetensors file `convert --dtype
f32` writes, and parameters x 4 bytes). Peak RSS from /usr/bin/time -v over --reps runs.

  bench/run_memory.py            # the full benchmark
  bench/run_memory.py --quick    # 4 + 4 prompts, all pairs, 1 run: checks the script
"""
import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as c  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    c.common_args(ap, reps=3)
    args = ap.parse_args()
    reps = c.reps_of(args)
    ours_bin = c.ensure_binary(not args.no_build)
    model_dir = c.ensure_converted()
    info = json.loads(subprocess.run([str(ours_bin), "inspect", "--model", c.MODEL, "--json"], env=c.env(),
                                     capture_output=True, text=True, check=True).stdout)
    weights = sum(f.stat().st_size for f in model_dir.glob("*.safetensors"))
    params4 = info["parameters"] * 4
    cmd = [ours_bin, "cosine", "--model", c.MODEL, "--out", c.WORK / "cosine_memory"]
    if args.quick:
        d = c.data_dir() / "paper"
        cmd += ["--normal", c.prompt_file("normal4", c.read_lines_csv(d / "cos_normal.csv")[:4]),
                "--malicious", c.prompt_file("malicious4", c.read_lines_csv(d / "cos_malicious.csv")[:4]), "--pairs", "all"]
    rss, wall = [], []
    for r in range(reps):
        t = c.timed(cmd, f"cosine {r + 1}/{reps}")
        rss.append(t.rss_kib * 1024); wall.append(t.wall)
    mib = lambda b: b / 2**20  # noqa: E731
    lines = [
        f"`cosine` on SmolLM2-135M-Instruct ({'8 prompts, all pairs' if args.quick else '200 prompts, 500 pairs per type'}), "
        f"{reps} runs.", "",
        "| figure | median (min-max) |", "|---|---|",
        f"| peak RSS MiB | {c.fmt_stats([mib(x) for x in rss])} |",
        f"| f32 weights MiB (safetensors of `convert --dtype f32`) | {mib(weights):.1f} |",
        f"| parameters x 4 bytes, MiB | {mib(params4):.1f} ({info['parameters']} parameters) |",
        f"| peak RSS / f32 weights (target <= 1.2) | {c.fmt_stats([x / weights for x in rss])} |",
        f"| whole process, wall s | {c.fmt_stats(wall)} |",
    ]
    c.record("memory (benchmark 5)", args, lines, peer=False)


if __name__ == "__main__":
    main()
