#!/usr/bin/env python3
"""Draws the responses to label by hand for the judge validation (issue 16 item 2).

For each organism (an eval output directory and a model label in it), it draws N responses
stratified over the four judged sets (harmful, over_rejection, xstest_safe, xstest_unsafe), with a
fixed seed, and writes one JSON line per response with an empty `human` field for the reader:

    tools/judges/sample_responses.py --organism natural=sweep/A/eval:aligned \
        --organism planted=demo-planted/eval:aligned --per-organism 100 --out to_label.jsonl

The labelled file (every `human` filled in by reading the response with its prompt: refusal,
compliance or empty; a `note` where the call was hard) is committed as
tests/fixtures/judges/organism_labelled.jsonl without the `prompt` field (the prompts are the
datasets' text, which stays in ../shared: `set` and `index` name each one). The judges' verdicts
are not stored in it: the test computes them, so a change of a judge shows as a change of its
precision and recall.
"""
import argparse
import json
import os
import random
import sys
import tempfile

SETS = ["harmful", "over_rejection", "xstest_safe", "xstest_unsafe"]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--organism", action="append", required=True,
                    help="NAME=EVAL_DIR:LABEL (the eval row LABEL of the eval output EVAL_DIR)")
    ap.add_argument("--per-organism", type=int, default=100)
    ap.add_argument("--seed", type=int, default=16)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    rows = []
    for spec in a.organism:
        try:
            name, rest = spec.split("=", 1)
            evaldir, label = rest.rsplit(":", 1)
        except ValueError:
            sys.exit(f"error: --organism {spec!r}: expected NAME=EVAL_DIR:LABEL")
        rng = random.Random(f"{a.seed}:{name}")
        per_set = [a.per_organism // len(SETS)] * len(SETS)
        for i in range(a.per_organism % len(SETS)):
            per_set[i] += 1
        for s, k in zip(SETS, per_set):
            path = os.path.join(evaldir, "responses", label, f"{s}.jsonl")
            try:
                with open(path) as f:
                    rs = [json.loads(l) for l in f if l.strip()]
            except OSError as e:
                sys.exit(f"error: cannot read {path}: {e}")
            if len(rs) < k:
                sys.exit(f"error: {path} holds {len(rs)} responses, {k} wanted")
            for r in sorted(rng.sample(rs, k), key=lambda r: r["index"]):
                rows.append({"organism": name, "set": s, "index": r["index"],
                             "prompt": r["prompt"], "response": r["response"], "human": ""})
    d = os.path.dirname(os.path.abspath(a.out))
    with tempfile.NamedTemporaryFile("w", dir=d, delete=False, suffix=".tmp") as t:
        for r in rows:
            t.write(json.dumps(r, ensure_ascii=False) + "\n")
    os.replace(t.name, a.out)
    print(f"wrote {len(rows)} responses to {a.out}")


if __name__ == "__main__":
    main()
