#!/usr/bin/env python3
"""Checks that a directory written by `safety-layers convert` loads in transformers
(AutoModelForCausalLM + AutoTokenizer) and reproduces transformers' own results on the GGUF
(tests/fixtures/gguf/smollm2_expected.json): token ids, all hidden states, greedy tokens.

Usage: python3 tools/check_convert.py --dir CONVERTED_DIR [--fixture tests/fixtures/gguf/smollm2_expected.json]
Needs: pip install torch transformers. Exits non-zero on any mismatch.
"""
import argparse
import json
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", required=True)
    ap.add_argument("--fixture", default="tests/fixtures/gguf/smollm2_expected.json")
    ap.add_argument("--tol", type=float, default=1e-3)
    args = ap.parse_args()
    torch.set_num_threads(2)
    fx = json.load(open(args.fixture))
    tok = AutoTokenizer.from_pretrained(args.dir)
    model = AutoModelForCausalLM.from_pretrained(args.dir, dtype=torch.float32)
    model.eval()
    worst = 0.0
    failures = 0
    for r in fx["results"]:
        ids = tok(r["prompt"])["input_ids"]
        if ids != r["input_ids"]:
            print(f"FAIL token ids of {r['instruction']!r}: {ids[:10]}... vs {r['input_ids'][:10]}...")
            failures += 1
            continue
        with torch.no_grad():
            out = model(torch.tensor([ids]), output_hidden_states=True)
        for k, (h, want) in enumerate(zip(out.hidden_states, r["last_token_hidden_states"])):
            got = h[0, -1]
            want = torch.tensor(want)
            err = ((got - want).abs() / want.abs().clamp(min=1.0)).max().item()
            worst = max(worst, err)
            if err > args.tol:
                print(f"FAIL hidden entry {k} of {r['instruction']!r}: relative error {err:.2e}")
                failures += 1
        with torch.no_grad():
            gen = model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=16, eos_token_id=fx["eos_token_id"])
        new = gen[0, len(ids):].tolist()
        if new != r["greedy"]["ids"]:
            print(f"FAIL greedy tokens of {r['instruction']!r}: {new} vs {r['greedy']['ids']}")
            failures += 1
    if tok.chat_template is None:
        print("FAIL no chat template in the converted tokenizer")
        failures += 1
    print(f"check_convert: {len(fx['results'])} prompts, largest hidden-state error {worst:.2e}, {failures} failures")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
