#!/usr/bin/env python3
"""llama.cpp as the peer for quantized GGUF files: next-token log-probabilities after each
prompt, greedy continuations and prompt-processing / decode speed, on token ids given (never
text), so tokenisation cannot differ from ours.

Usage:
  python3 bench/peer_llamacpp.py --gguf FILE.gguf --ids IDS.json --out OUT.json \
      [--greedy 16] [--threads 2]

IDS.json is either a JSON list of token-id lists (one per prompt) or the JSON written by
`safety-layers logits` (its items[].input_ids). OUT.json holds per prompt the ids, the top-5
and the greedy tokens; the log-probabilities go beside it as OUT.npy ([prompts, vocab]
float32), as `safety-layers logits` writes them, so tools/check_quant_parity.py reads both.

Needs llama-cpp-python (bench/requirements.txt; it builds llama.cpp from source). Each prompt
starts from an empty KV cache; the ids are fed exactly as given (no BOS is added); greedy is
argmax (first index on ties, as ours) for exactly --greedy tokens, EOS included, so lengths
compare.
"""
import argparse
import ctypes
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def fail(msg):
    sys.exit(f"peer_llamacpp: {msg}")


def read_ids(path):
    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        fail(f"--ids {path}: {e}")
    if isinstance(doc, dict):
        if not isinstance(doc.get("items"), list):
            fail(f"--ids {path}: a JSON object needs an `items` list (safety-layers logits output)")
        rows = []
        for i, it in enumerate(doc["items"]):
            if not isinstance(it, dict) or "input_ids" not in it:
                fail(f"--ids {path}: items[{i}] has no `input_ids`")
            rows.append(it["input_ids"])
    elif isinstance(doc, list):
        rows = doc
    else:
        fail(f"--ids {path}: expected a list of token-id lists or an object with `items`")
    if not rows:
        fail(f"--ids {path}: no prompts")
    for i, r in enumerate(rows):
        if not isinstance(r, list) or not r or not all(isinstance(t, int) and t >= 0 for t in r):
            fail(f"--ids {path}: prompt {i} is not a non-empty list of non-negative integers")
    return rows


def log_softmax(x):
    x = x.astype(np.float64)
    m = x.max()
    return (x - m - np.log(np.exp(x - m).sum())).astype(np.float32)


def ggml_info(llama_cpp):
    """ggml's version and build commit, from the shared library the bindings loaded."""
    lib_dir = Path(llama_cpp.__file__).parent / "lib"
    for name in ("libggml-base.so", "libggml.so"):
        p = lib_dir / name
        if not p.exists():
            continue
        lib = ctypes.CDLL(str(p))
        out = {}
        for sym in ("ggml_version", "ggml_commit"):
            if hasattr(lib, sym):
                f = getattr(lib, sym)
                f.restype = ctypes.c_char_p
                out[sym[5:]] = f().decode()
        return out
    return {}


# ggml_log_level (ggml.h): 1 debug, 2 info, 3 warn, 4 error, 5 continues the last line.
KEPT_LOG_LEVELS = (3, 4)


def quiet_logs(llama_cpp):
    """llama.cpp logs every load and context step on stderr; keep its warnings and errors."""
    last = [0]

    @llama_cpp.llama_log_callback
    def log(level, text, _user):
        if level != 5:
            last[0] = level
        if last[0] in KEPT_LOG_LEVELS and text:
            sys.stderr.write(text.decode(errors="replace"))
    llama_cpp.llama_log_set(log, None)
    return log  # the caller keeps it alive while llama.cpp may call it


class Peer:
    """A llama.cpp model and context on the CPU, driven through its C API."""

    def __init__(self, llama_cpp, gguf, threads, n_ctx, n_batch):
        self.ll = llama_cpp
        llama_cpp.llama_backend_init()
        mp = llama_cpp.llama_model_default_params()
        mp.n_gpu_layers = 0
        self.model = llama_cpp.llama_model_load_from_file(str(gguf).encode(), mp)
        if not self.model:
            fail(f"--gguf {gguf}: llama.cpp could not load it")
        cp = llama_cpp.llama_context_default_params()
        cp.n_ctx = n_ctx
        cp.n_batch = n_batch
        cp.n_ubatch = n_batch  # a whole prompt in one graph, as our prefill runs it
        cp.n_threads = threads
        cp.n_threads_batch = threads
        # llama.cpp's defaults otherwise (f16 KV cache, flash attention on "auto"): what its
        # users get; recorded in the output since they move the numbers.
        self.settings = {k: getattr(cp, k) for k in ("n_ctx", "n_batch", "n_ubatch", "type_k",
                                                     "type_v", "flash_attn_type")
                         if hasattr(cp, k)}
        self.ctx = llama_cpp.llama_init_from_model(self.model, cp)
        if not self.ctx:
            fail(f"--gguf {gguf}: llama.cpp could not create a context (n_ctx {n_ctx})")
        vocab = llama_cpp.llama_model_get_vocab(self.model)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(vocab)
        self.mem = llama_cpp.llama_get_memory(self.ctx)

    def clear(self):
        self.ll.llama_memory_clear(self.mem, True)

    def decode(self, ids):
        """Feeds ids after what the cache holds; returns the logits after the last one."""
        arr = (self.ll.llama_token * len(ids))(*ids)
        rc = self.ll.llama_decode(self.ctx, self.ll.llama_batch_get_one(arr, len(ids)))
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc}")
        ptr = self.ll.llama_get_logits_ith(self.ctx, -1)
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).copy()

    def close(self):
        self.ll.llama_free(self.ctx)
        self.ll.llama_model_free(self.model)


def write_atomic(path, write):
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gguf", required=True)
    ap.add_argument("--ids", required=True)
    ap.add_argument("--out", required=True, help="output .json; the .npy goes beside it")
    ap.add_argument("--greedy", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    out = Path(args.out)
    if out.suffix != ".json":
        fail(f"--out {out}: expected a .json file name")
    if not out.parent.is_dir():
        fail(f"--out {out}: directory {out.parent} does not exist")
    if not Path(args.gguf).is_file():
        fail(f"--gguf {args.gguf}: no such file")
    if args.greedy < 0 or args.threads < 1:
        fail("--greedy must be >= 0 and --threads >= 1")
    rows = read_ids(args.ids)
    try:
        import llama_cpp
    except ImportError:
        fail("needs llama-cpp-python (pip install -r bench/requirements.txt)")

    _log = quiet_logs(llama_cpp)  # noqa: F841
    longest = max(len(r) for r in rows)
    peer = Peer(llama_cpp, args.gguf, args.threads, n_ctx=longest + args.greedy + 8,
                n_batch=max(512, longest))
    for i, r in enumerate(rows):
        bad = [t for t in r if t >= peer.n_vocab]
        if bad:
            fail(f"--ids {args.ids}: prompt {i} holds id {bad[0]}, outside the vocabulary "
                 f"({peer.n_vocab}) of {args.gguf}")

    # One untimed prompt and step first: the first decode pays one-off set-up (thread pool,
    # weight repacking) that is not per-prompt cost.
    peer.clear()
    peer.decode([int(np.argmax(peer.decode(rows[0])))])
    peer.clear()

    logprobs = np.empty((len(rows), peer.n_vocab), dtype=np.float32)
    items = []
    pp_s = dec_s = 0.0
    dec_steps = 0
    for i, r in enumerate(rows):
        peer.clear()
        t0 = time.perf_counter()
        logits = peer.decode(r)
        pp_s += time.perf_counter() - t0
        if not np.isfinite(logits).all():
            fail(f"prompt {i}: llama.cpp returned NaN or infinite logits")
        logprobs[i] = log_softmax(logits)
        top = np.argsort(-logprobs[i], kind="stable")[:5]
        greedy = []
        if args.greedy > 0:
            greedy.append(int(np.argmax(logits)))
            t0 = time.perf_counter()
            for _ in range(args.greedy - 1):
                greedy.append(int(np.argmax(peer.decode(greedy[-1:]))))
            dec_s += time.perf_counter() - t0
            dec_steps += args.greedy - 1
        items.append({"input_ids": r, "top5": [[int(t), float(logprobs[i, t])] for t in top],
                      "greedy": greedy})
    peer.close()

    pp_tokens = sum(len(r) for r in rows)
    npy = out.with_suffix(".npy")
    write_atomic(npy, lambda f: np.save(f, logprobs))
    doc = {
        "implementation": "llama.cpp",
        "llama_cpp_python": llama_cpp.__version__,
        "ggml": ggml_info(llama_cpp),
        "system_info": llama_cpp.llama_print_system_info().decode().strip(),
        "model": str(args.gguf),
        "context_params": peer.settings,
        "vocab_size": peer.n_vocab,
        "logprobs": npy.name,
        "logprobs_shape": list(logprobs.shape),
        "greedy_tokens": args.greedy,
        "timings": {
            "threads": args.threads,
            "prompt_tokens": pp_tokens,
            "prompt_seconds": pp_s,
            "prompt_tokens_per_s": pp_tokens / pp_s,
            # The first greedy token comes from the prompt's logits; each further one is a
            # one-token decode step.
            "decode_steps": dec_steps,
            "decode_seconds": dec_s,
            "decode_tokens_per_s": dec_steps / dec_s if dec_s > 0 else None,
        },
        "items": items,
    }
    write_atomic(out, lambda f: f.write(json.dumps(doc, indent=1).encode()))
    t = doc["timings"]
    dec = f"{t['decode_tokens_per_s']:.1f}" if t["decode_tokens_per_s"] else "-"
    print(f"llama.cpp {doc['ggml'].get('commit', '?')}: {len(rows)} prompts, "
          f"pp {t['prompt_tokens_per_s']:.1f} tok/s, decode {dec} tok/s "
          f"({args.threads} threads); wrote {out} and {npy}", file=sys.stderr)


if __name__ == "__main__":
    main()
