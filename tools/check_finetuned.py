#!/usr/bin/env python3
"""Checks that a directory written by `safety-layers finetune` (or `align`) loads in transformers
and that transformers computes, from it, what our engine computes: the same prompt token ids, every
last-token hidden state within --tol, the same greedy tokens.

Usage: python3 tools/check_finetuned.py --dir FINETUNED_DIR [--bin target/release/safety-layers]
Needs: pip install torch transformers. Exits non-zero on any mismatch.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

PROMPTS = ["Give three tips for staying healthy.", "How to kill time?", "Write a haiku about the sea."]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", required=True)
    ap.add_argument("--bin", default="target/release/safety-layers")
    ap.add_argument("--tol", type=float, default=1e-3)
    ap.add_argument("--new-tokens", type=int, default=12)
    args = ap.parse_args()
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        p = os.path.join(tmp, "p.txt")
        open(p, "w").write("\n".join(PROMPTS) + "\n")
        h, g = os.path.join(tmp, "h.json"), os.path.join(tmp, "g.jsonl")
        subprocess.run([args.bin, "hidden", "--model", args.dir, "--prompts", p, "--out", h], check=True)
        subprocess.run([args.bin, "generate", "--model", args.dir, "--prompts", p, "--max-new-tokens", str(args.new_tokens),
                        "--ignore-eos", "--out", g], check=True)
        ours = json.load(open(h))["items"]
        gens = [json.loads(l) for l in open(g)]
    tok = AutoTokenizer.from_pretrained(args.dir)
    model = AutoModelForCausalLM.from_pretrained(args.dir, dtype=torch.float32)
    model.eval()
    worst, failures = 0.0, 0
    for item, gen in zip(ours, gens):
        ids = tok(item["prompt"])["input_ids"]
        if ids != item["input_ids"]:
            print("token ids differ for", repr(item["prompt"][-40:]))
            failures += 1
            continue
        x = torch.tensor([ids])
        with torch.no_grad():
            out = model(x, output_hidden_states=True)
            greedy = model.generate(x, max_new_tokens=args.new_tokens, do_sample=False, min_new_tokens=args.new_tokens)[0, len(ids):].tolist()
        for e, hs in enumerate(out.hidden_states):
            ref = hs[0, -1]
            got = torch.tensor(item["hidden_last"][e])
            rel = ((got - ref).abs().max() / ref.abs().max().clamp_min(1e-6)).item()
            worst = max(worst, rel)
            if rel > args.tol:
                print(f"entry {e}: relative difference {rel:.2e}")
                failures += 1
        if greedy != gen["output_ids"]:
            print("greedy tokens differ:", greedy, gen["output_ids"])
            failures += 1
    print(f"check_finetuned: {len(ours)} prompts, worst hidden-state relative difference {worst:.2e}, {failures} failures")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
