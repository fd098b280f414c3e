#!/usr/bin/env python3
"""Compares next-token distributions and greedy continuations of two runs on identical token
ids: ours (`safety-layers logits`) against a peer (bench/peer_llamacpp.py), and optionally ours
on quantized weights against ours in f32.

Usage:
  python3 tools/check_quant_parity.py --ours OURS.json --peer PEER.json \
      [--f32 OURS_F32.json] [--json OUT.json]

Each JSON names its [prompts, vocab] float32 log-probabilities (`logprobs`, a .npy path
relative to the JSON) and holds items[].input_ids and items[].greedy. Reported per pair: top-1
agreement of the next token, mean and max KL(reference || ours) in nats, greedy sequences equal
and the mean common-prefix length. Prints a markdown table; --json writes the same numbers.
Exits non-zero on bad input (different ids, shapes or vocabularies), never on the numbers.
"""
import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np


def fail(msg):
    sys.exit(f"check_quant_parity: {msg}")


def load(path, flag):
    p = Path(path)
    try:
        doc = json.loads(p.read_text())
    except (OSError, ValueError) as e:
        fail(f"{flag} {p}: {e}")
    for key in ("logprobs", "items"):
        if key not in doc:
            fail(f"{flag} {p}: no `{key}` field")
    npy = p.parent / doc["logprobs"]
    try:
        lp = np.load(npy)
    except (OSError, ValueError) as e:
        fail(f"{flag} {p}: its logprobs file {npy}: {e}")
    if lp.ndim != 2 or lp.dtype != np.float32:
        fail(f"{flag} {npy}: expected a 2-D float32 array, got {lp.dtype} {lp.shape}")
    if lp.shape[0] != len(doc["items"]):
        fail(f"{flag} {npy}: {lp.shape[0]} rows for {len(doc['items'])} items in {p}")
    if not np.isfinite(lp).all():
        fail(f"{flag} {npy}: NaN or infinite log-probabilities")
    for i, it in enumerate(doc["items"]):
        for key in ("input_ids", "greedy"):
            if not isinstance(it.get(key), list):
                fail(f"{flag} {p}: items[{i}] has no `{key}` list")
    return doc, lp


def compare(ref_name, ref, other_name, other):
    """Metrics of `other` against the reference distribution `ref` (KL(ref || other))."""
    (rdoc, rlp), (odoc, olp) = ref, other
    if len(rdoc["items"]) != len(odoc["items"]):
        fail(f"{ref_name} has {len(rdoc['items'])} prompts, {other_name} {len(odoc['items'])}")
    for i, (a, b) in enumerate(zip(rdoc["items"], odoc["items"])):
        if a["input_ids"] != b["input_ids"]:
            fail(f"prompt {i}: the input_ids of {ref_name} and {other_name} differ; both sides "
                 f"must be fed the same ids (pass ours as the peer's --ids)")
    if rlp.shape != olp.shape:
        fail(f"log-probabilities of {ref_name} {rlp.shape} and {other_name} {olp.shape} differ "
             f"in shape (vocabulary sizes?)")
    r = rlp.astype(np.float64)
    o = olp.astype(np.float64)
    # Rows are log-softmax already; renormalising in f64 removes the f32 rounding of each
    # row's normaliser, so identical inputs give KL 0 and tiny KLs are not rounding noise.
    r -= np.logaddexp.reduce(r, axis=1, keepdims=True)
    o -= np.logaddexp.reduce(o, axis=1, keepdims=True)
    kl = np.maximum((np.exp(r) * (r - o)).sum(axis=1), 0.0)
    top1 = r.argmax(axis=1) == o.argmax(axis=1)
    equal = 0
    prefixes = []
    for a, b in zip(rdoc["items"], odoc["items"]):
        ga, gb = a["greedy"], b["greedy"]
        if len(ga) != len(gb):
            fail(f"greedy lengths differ ({len(ga)} vs {len(gb)}): run both with the same --greedy")
        n = 0
        while n < len(ga) and ga[n] == gb[n]:
            n += 1
        prefixes.append(n)
        equal += n == len(ga)
    return {
        "reference": ref_name,
        "compared": other_name,
        "prompts": len(kl),
        "top1_agree": int(top1.sum()),
        "mean_kl_nats": float(kl.mean()),
        "max_kl_nats": float(kl.max()),
        "greedy_tokens": len(rdoc["items"][0]["greedy"]),
        "greedy_equal": int(equal),
        "mean_common_prefix": float(np.mean(prefixes)),
    }


def table(rows):
    head = "| reference | compared | prompts | top-1 agree | mean KL (nats) | max KL (nats) " \
           "| greedy-N equal | mean common prefix |"
    lines = [head, "|" + "---|" * 8]
    for m in rows:
        lines.append(
            f"| {m['reference']} | {m['compared']} | {m['prompts']} "
            f"| {m['top1_agree']}/{m['prompts']} | {m['mean_kl_nats']:.3g} "
            f"| {m['max_kl_nats']:.3g} | {m['greedy_equal']}/{m['prompts']} (N={m['greedy_tokens']}) "
            f"| {m['mean_common_prefix']:.2f} |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ours", required=True, help="safety-layers logits on the quantized file")
    ap.add_argument("--peer", required=True, help="bench/peer_llamacpp.py on the same file")
    ap.add_argument("--f32", help="safety-layers logits in f32 on the dequantized weights")
    ap.add_argument("--json", help="also write the numbers here")
    args = ap.parse_args()
    ours = load(args.ours, "--ours")
    peer = load(args.peer, "--peer")
    peer_name = peer[0].get("implementation", "peer")
    rows = [compare(peer_name, peer, "ours", ours)]
    if args.f32:
        rows.append(compare("ours f32", load(args.f32, "--f32"), "ours", ours))
    print(table(rows))
    if args.json:
        out = Path(args.json)
        doc = {"ours": args.ours, "peer": args.peer, "f32": args.f32, "comparisons": rows}
        fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(doc, f, indent=1)
            os.replace(tmp, out)
        except BaseException:
            os.unlink(tmp)
            raise


if __name__ == "__main__":
    main()
