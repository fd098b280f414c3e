#!/usr/bin/env python3
"""Benchmark: memory and speed at the paper's scale, on a synthetic Llama-3-8B-Instruct checkpoint.

The checkpoint comes from tools/make_synthetic_checkpoint.py (Llama-3-8B-Instruct's config and
tensor names, random weights): bf16 safetensors sharded as the real one, and GGUF files. Random
weights measure memory and speed only, never outputs.

For each file, with --dtype auto (an 8B model keeps its storage: bf16 stays bf16, GGUF stays
quantized), each command under /usr/bin/time -v (peak RSS):
  inspect                                   load time, weights held in memory
  hidden   32 paper-normal prompts          prefill tok/s (every layer's last-token state)
  logits   8 paper-normal prompts, greedy 16 prompt tok/s and decode tok/s (as bench/run_quant.py)
  locate   one range (--initial, --span 0, --judge probe) on --locate-limit D_o queries
Target (issue 14): peak RSS <= 1.1 x the weights' size on disk + 1 GiB.

  bench/run_scale.py --dir /work/synth/l3-8b [--files bf16,Q8_0,Q4_0] [--skip-locate]
"""
import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as c  # noqa: E402


def size_on_disk(p):
    p = Path(p)
    if p.is_dir():
        return sum(f.stat().st_size for f in p.glob("*.safetensors"))
    return p.stat().st_size


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    c.common_args(ap, reps=1)
    ap.add_argument("--dir", required=True, help="make_synthetic_checkpoint.py's --out")
    ap.add_argument("--files", default="bf16,Q8_0,Q4_0")
    ap.add_argument("--skip-locate", action="store_true")
    ap.add_argument("--locate-limit", type=int, default=4)
    ap.add_argument("--initial", default="14-16")
    args = ap.parse_args()
    c.ensure_binary(build=not args.no_build)
    c.WORK.mkdir(parents=True, exist_ok=True)
    base = Path(args.dir)
    rows = []
    for kind in args.files.split(","):
        path = base / "bf16" if kind == "bf16" else base / f"synthetic-8b.{kind}.gguf"
        if not path.exists():
            sys.exit(f"{path} is missing: run tools/make_synthetic_checkpoint.py --out {base}")
        disk = size_on_disk(path) / 2**30
        target = 1.1 * disk + 1.0
        r = {"file": kind, "disk_gib": disk, "target_gib": target}
        t = c.timed([c.OURS, "inspect", "--model", path, "--json"], f"{kind} inspect")
        info = json.loads(t.stdout)
        r.update(load_s=info["load_seconds"], held=info.get("weights_in_memory"),
                 held_gib=info.get("weight_bytes", 0) / 2**30, rss_inspect=t.rss_kib / 2**20)
        t = c.timed([c.OURS, "hidden", "--model", path, "--prompts", "paper-normal", "--limit", 32,
                     "--batch-size", 8, "--out", c.WORK / "scale_hidden.safetensors"], f"{kind} hidden")
        line = c.tokens_per_s_line(t.stderr, "hidden")
        r.update(hidden_tok_s=line["tok_s"], hidden_tokens=line["tokens"], rss_hidden=t.rss_kib / 2**20,
                 wall_hidden=t.wall)
        out = c.WORK / "scale_logits.json"
        t = c.timed([c.OURS, "logits", "--model", path, "--prompts", "paper-normal", "--limit", 8,
                     "--greedy", 16, "--batch-size", 8, "--out", out], f"{kind} generate")
        d = json.loads(out.read_text())["timings"]
        r.update(pp_tok_s=d["prompt_tokens"] / d["logits_seconds"],
                 decode_tok_s=8 * 15 / max(d["greedy_seconds"] - d["logits_seconds"], 1e-9),
                 rss_generate=t.rss_kib / 2**20, wall_generate=t.wall)
        if not args.skip_locate:
            t = c.timed([c.OURS, "locate", "--model", path, "--initial", args.initial, "--alpha", "1.2",
                         "--span", 0, "--judge", "probe", "--limit", args.locate_limit, "--max-new-tokens", 8,
                         "--batch-size", args.locate_limit, "--out", c.WORK / f"scale_locate_{kind}"],
                        f"{kind} locate")
            loc = json.loads((c.WORK / f"scale_locate_{kind}" / "locate.json").read_text())
            r.update(locate_s=loc["seconds"], locate_runs=len(loc["runs"]), rss_locate=t.rss_kib / 2**20)
        r["peak_gib"] = max(v for k, v in r.items() if k.startswith("rss_"))
        rows.append(r)
        print(json.dumps(r), file=sys.stderr, flush=True)
    f = c.fmt
    lines = ["Synthetic Llama-3-8B-Instruct (random weights; tools/make_synthetic_checkpoint.py), --dtype auto.", "",
             "| file | on disk GiB | held in memory | load s | hidden tok/s (32 prompts) | prompt tok/s (8) "
             "| decode tok/s (8 rows) | locate s (runs) | peak RSS GiB: inspect / hidden / generate / locate "
             "| target GiB | within |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        rss = " / ".join(f(r.get(k)) for k in ["rss_inspect", "rss_hidden", "rss_generate", "rss_locate"])
        loc = f"{f(r['locate_s'])} ({r['locate_runs']})" if "locate_s" in r else "-"
        lines.append(f"| {r['file']} | {f(r['disk_gib'])} | {r['held']} ({f(r['held_gib'])} GiB) | {f(r['load_s'])} "
                     f"| {f(r['hidden_tok_s'])} | {f(r['pp_tok_s'])} | {f(r['decode_tok_s'])} | {loc} | {rss} "
                     f"| {f(r['target_gib'])} | {'yes' if r['peak_gib'] <= r['target_gib'] else 'NO'} |")
    lines += ["", "- " + json.dumps(rows)]
    c.record("8B scale: memory and speed (synthetic Llama-3-8B-Instruct)", args, lines, peer=False)


if __name__ == "__main__":
    main()
