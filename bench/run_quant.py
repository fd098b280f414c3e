#!/usr/bin/env python3
"""Benchmark: quantized GGUF compute against llama.cpp, same files, same token ids, same threads.

For each GGUF (SmolLM2-135M-Instruct: the shipped Q4_1 file, and Q8_0 / Q4_0 files made by
tools/make_gguf.py from its dequantised f32 weights), on the first --prompts D_o queries (Alpaca
template) with --greedy new tokens each:

ours: `safety-layers logits --dtype native` (weights stay quantized): next-token log-probs of
      every prompt (batched, left-padded: "prompt processing"), then greedy decoding of --greedy
      tokens. prompt tok/s = prompt tokens / logits seconds; decode tok/s = prompts x (greedy-1)
      / (greedy seconds - logits seconds) (greedy re-runs the prompts first). Run twice: at the
      default batch of 32 sequences, and with --batch-size 1 (one sequence at a time, as the peer).
peer: bench/peer_llamacpp.py (llama-cpp-python, llama.cpp's C API): each prompt from a fresh KV
      cache, one decode call for the prompt, then one per new token; same ids (no BOS added).
Alternates ours / peer for --reps repetitions, and checks every repetition's parity: next-token
top-1 agreement, mean KL(peer || ours) and greedy equality (tools/check_quant_parity.py).

  bench/run_quant.py --reps 3       # on a quiet machine
  bench/run_quant.py --quick        # 8 prompts, 1 repetition, Q4_1 only: checks the script
"""
import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as c  # noqa: E402

SHIPPED = "SmolLM2-135M-Instruct.Q4_1.gguf"


def made_gguf(kind):
    """A GGUF of the dequantised SmolLM2 weights at `kind`, made once into bench/work/."""
    out = c.WORK / f"smollm2-135m-instruct.{kind.upper()}.gguf"
    if not out.exists():
        src = c.ensure_converted()
        r = c.sh([sys.executable, c.ROOT / "tools" / "make_gguf.py", "--hf", src, "--out", out,
                  "--type", kind, "--pre", "smollm"])
        if r.returncode != 0:
            sys.exit(f"make_gguf {kind} failed")
    return out


def ours_run(gguf, n, greedy, batch, out):
    t = c.timed([c.OURS, "logits", "--model", gguf, "--dtype", "native", "--prompts", "over-rejection",
                 "--limit", n, "--greedy", greedy, "--batch-size", batch, "--out", out], f"ours b{batch}")
    d = json.loads(Path(out).read_text())["timings"]
    dec = n * (greedy - 1) / max(d["greedy_seconds"] - d["logits_seconds"], 1e-9)
    return {"pp": d["prompt_tokens"] / d["logits_seconds"], "dec": dec, "rss": t.rss_kib / 1024}


def peer_run(gguf, ids_json, greedy, threads, out):
    t = c.timed([c.peer_python(), c.BENCH / "peer_llamacpp.py", "--gguf", gguf, "--ids", ids_json,
                 "--greedy", greedy, "--threads", threads, "--out", out], "llama.cpp")
    d = json.loads(Path(out).read_text())
    return {"pp": d["timings"]["prompt_tokens_per_s"], "dec": d["timings"]["decode_tokens_per_s"],
            "rss": t.rss_kib / 1024, "version": d.get("ggml", {}), "ctx": d.get("context_params")}


def parity(ours, peer):
    r = subprocess.run([sys.executable, c.ROOT / "tools" / "check_quant_parity.py", "--ours", ours,
                        "--peer", peer, "--json", str(c.WORK / "parity.json")],
                       capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit("parity check failed:\n" + r.stdout + r.stderr)
    return json.loads((c.WORK / "parity.json").read_text())


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    c.common_args(ap, reps=3)
    ap.add_argument("--prompts", type=int, default=128)
    ap.add_argument("--greedy", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2, help="llama.cpp threads (ours: rayon, all cores)")
    args = ap.parse_args()
    c.ensure_binary(build=not args.no_build)
    c.WORK.mkdir(parents=True, exist_ok=True)
    n = 8 if args.quick else args.prompts
    kinds = ["q4_1"] if args.quick else ["q4_1", "q8_0", "q4_0"]
    lines = []
    for kind in kinds:
        gguf = c.models_dir() / SHIPPED if kind == "q4_1" else made_gguf(kind)
        rows = {k: [] for k in ["ours32", "ours1", "peer"]}
        par = None
        for rep in range(c.reps_of(args)):
            o32 = c.WORK / f"quant_{kind}_ours32.json"
            rows["ours32"].append(ours_run(gguf, n, args.greedy, 32, o32))
            p = c.WORK / f"quant_{kind}_peer.json"
            rows["peer"].append(peer_run(gguf, o32, args.greedy, args.threads, p))
            o1 = c.WORK / f"quant_{kind}_ours1.json"
            rows["ours1"].append(ours_run(gguf, n, args.greedy, 1, o1))
            par = parity(o32, p)
        peer = rows["peer"]
        lines += [f"### {kind.upper()} ({gguf.name})", "",
                  c.table([("prompt processing tok/s, batch 32", "higher", [r["pp"] for r in rows["ours32"]], [r["pp"] for r in peer]),
                           ("decode tok/s, batch 32", "higher", [r["dec"] for r in rows["ours32"]], [r["dec"] for r in peer]),
                           ("prompt processing tok/s, batch 1", "higher", [r["pp"] for r in rows["ours1"]], [r["pp"] for r in peer]),
                           ("decode tok/s, batch 1", "higher", [r["dec"] for r in rows["ours1"]], [r["dec"] for r in peer]),
                           ("peak RSS MiB (batch 32)", "lower", [r["rss"] for r in rows["ours32"]], [r["rss"] for r in peer])],
                          ours="ours", peer="llama.cpp"), "",
                  f"- parity (last repetition, ours at batch 32 vs llama.cpp): {json.dumps(par)}",
                  f"- llama.cpp: {json.dumps(peer[-1]['version'])}; context {json.dumps(peer[-1]['ctx'])}", ""]
    c.record(f"quantized GGUF vs llama.cpp, SmolLM2-135M-Instruct, {n} D_o prompts x {args.greedy} tokens",
             args, lines, peer=False)


if __name__ == "__main__":
    main()
