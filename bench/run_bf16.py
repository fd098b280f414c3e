#!/usr/bin/env python3
"""Benchmark: bf16 weights, ours against transformers in bf16 on the CPU, same checkpoint.

The checkpoint is SmolLM2-135M-Instruct written as bf16 safetensors by our `convert --dtype
bf16` (the GGUF's weights dequantised, then rounded to bf16), made once into bench/work/.

ours: `safety-layers hidden|generate --dtype bf16`: weights stay bf16 in memory, widened a tile
      at a time; activations and accumulation f32.
peer: transformers with `dtype=torch.bfloat16` (weights and compute in bf16), at batch 16, by
      bench/peer_hidden.py / peer_generate.py --dtype bf16.
Hidden states: the 200 cosine prompts (Alpaca template); generation: the first --gen-prompts D_o
queries x 16 new tokens, EOS stops a row (both sides). Alternates ours / peer for --reps
repetitions. The two sides compute differently (bf16 vs f32 activations), so the check lines
report their distance rather than demand equality (the bf16 correctness tests in
crates/engine/tests/it/bf16.rs prove our path against transformers).

  bench/run_bf16.py --reps 3     # on a quiet machine
  bench/run_bf16.py --quick      # 8 prompts, 1 repetition: checks the script
"""
import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as c  # noqa: E402


def bf16_dir():
    out = c.WORK / "smollm2-135m-instruct-bf16"
    if not (out / "config.json").exists():
        r = c.sh([c.OURS, "convert", "--model", c.MODEL, "--out", out, "--dtype", "bf16"])
        if r.returncode != 0:
            sys.exit("convert failed")
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    c.common_args(ap, reps=3)
    ap.add_argument("--gen-prompts", type=int, default=64)
    args = ap.parse_args()
    c.ensure_binary(build=not args.no_build)
    c.WORK.mkdir(parents=True, exist_ok=True)
    model = bf16_dir()
    py = c.peer_python()
    n = 8 if args.quick else 200
    g = 8 if args.quick else args.gen_prompts
    hid_prompts = c.prompt_file(f"cosine{n}", c.cosine_prompts()[:n])
    gen_prompts = c.prompt_file(f"do{g}", c.over_rejection_prompts()[:g])
    ours_h, ours_g = c.WORK / "bf16_hidden.safetensors", c.WORK / "bf16_generate.jsonl"
    rows = {k: [] for k in ["oh", "ph", "og", "pg", "ohr", "phr", "ogr", "pgr"]}
    checks = []
    for r in range(c.reps_of(args)):
        o = c.timed([c.OURS, "hidden", "--model", model, "--dtype", "bf16", "--prompts", hid_prompts,
                     "--batch-size", 16, "--out", ours_h], f"ours hidden {r + 1}")
        rows["oh"].append(c.tokens_per_s_line(o.stderr, "hidden")["tok_s"])
        rows["ohr"].append(o.rss_kib / 1024)
        p = c.timed([py, c.BENCH / "peer_hidden.py", "--model-dir", model, "--dtype", "bf16", "--prompts",
                     hid_prompts, "--batch-sizes", 16, "--ours", ours_h, "--threads", args.peer_threads],
                    f"peer hidden {r + 1}")
        res = p.last_json()
        rows["ph"].append(res["tok_s"])
        rows["phr"].append(p.rss_kib / 1024)
        checks.append(res["check"])
        o = c.timed([c.OURS, "generate", "--model", model, "--dtype", "bf16", "--prompts", gen_prompts,
                     "--max-new-tokens", 16, "--batch-size", 16, "--out", ours_g], f"ours generate {r + 1}")
        line = c.tokens_per_s_line(o.stderr, "generate (new tokens)")
        rows["og"].append(line["tok_s"])
        rows["ogr"].append(o.rss_kib / 1024)
        p = c.timed([py, c.BENCH / "peer_generate.py", "--model-dir", model, "--dtype", "bf16", "--prompts",
                     gen_prompts, "--max-new-tokens", 16, "--batch-size", 16, "--ours", ours_g,
                     "--threads", args.peer_threads], f"peer generate {r + 1}")
        res = p.last_json()
        rows["pg"].append(res["tok_s"])
        rows["pgr"].append(p.rss_kib / 1024)
        checks.append(res["check"])
    lines = [f"SmolLM2-135M-Instruct as bf16 safetensors; hidden states: {n} prompts, batch 16 both; "
             f"generation: {g} D_o prompts x 16 new tokens, batch 16 both.", "",
             c.table([("hidden states tok/s in-process", "higher", rows["oh"], rows["ph"]),
                      ("hidden, peak RSS MiB", "lower", rows["ohr"], rows["phr"]),
                      ("generation new tok/s in-process", "higher", rows["og"], rows["pg"]),
                      ("generate, peak RSS MiB", "lower", rows["ogr"], rows["pgr"])],
                     ours="ours bf16", peer="transformers bf16"), "",
             f"- distance between the sides (last repetition): {json.dumps(checks[-2:])}"]
    c.record("bf16 weights vs transformers bf16 (CPU)", args, lines)


if __name__ == "__main__":
    main()
