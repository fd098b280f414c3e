#!/usr/bin/env python3
"""The peer of `safety-layers hidden`: transformers' output_hidden_states at the last prompt token.

Same inputs as ours: the JSONL records, the Alpaca template, the tokenizer's defaults, prompts
sorted longest first and left-padded (positions counted from each row's first real token, as
ours does; a plain forward would count them from the padding). The base model is called, so no
lm_head is computed (ours computes none either). Times the batches only, not loading or
tokenising, nor one untimed warm-up batch. With several --batch-sizes it times each once and
reports the best.

Prints one JSON line: {"batch_size", "tokens", "seconds", "tok_s", "lengths", "shared", "per_batch_size",
"check"} where check compares with ours' .safetensors (--ours): token ids equal and the largest
relative error of the hidden states.
"""
import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import peer_common as pc  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402


def run(base, ids, batch_size, pad):
    order = pc.longest_first(ids)
    out = [None] * len(ids)
    with torch.inference_mode():  # one untimed batch: the peer's first call pays one-off set-up
        x, mask, pos = pc.left_pad([ids[i] for i in order[:batch_size]], pad)
        base(input_ids=x, attention_mask=mask, position_ids=pos, output_hidden_states=True, use_cache=False)
    t0 = time.perf_counter()
    with torch.inference_mode():
        for s in range(0, len(order), batch_size):
            chunk = order[s:s + batch_size]
            x, mask, pos = pc.left_pad([ids[i] for i in chunk], pad)
            o = base(input_ids=x, attention_mask=mask, position_ids=pos, output_hidden_states=True, use_cache=False)
            last = torch.stack([h[:, -1] for h in o.hidden_states], 1)  # [B, L+1, H]
            for j, i in enumerate(chunk):
                out[i] = last[j]
    secs = time.perf_counter() - t0
    return torch.stack(out).float().numpy(), secs


def check(ours_path, ids, states):
    from safetensors import safe_open
    with safe_open(str(ours_path), framework="np") as f:
        meta = f.metadata()
        theirs = f.get_tensor("hidden_last")
    ours_ids = json.loads(meta["input_ids"])
    same_ids = ours_ids == ids
    if theirs.shape != states.shape:
        return {"ids_equal": same_ids, "shape_ours": list(theirs.shape), "shape_peer": list(states.shape)}
    rel = np.abs(states - theirs) / np.maximum(np.abs(theirs), 1.0)
    return {"ids_equal": same_ids, "max_rel_err": float(rel.max())}


def shared_prefix_len(ids):
    """Tokens every prompt starts with, each keeping one of its own (the engine's rule)."""
    if len(ids) < 2:
        return 0
    n = len(ids[0]) - 1
    for p in ids[1:]:
        same = 0
        for a, b in zip(p, ids[0]):
            if a != b:
                break
            same += 1
        n = min(n, same, len(p) - 1)
    return max(n, 0)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--prompts", required=True, help="JSONL records {instruction[, input]}")
    ap.add_argument("--batch-sizes", default="16", help="comma list; the best is reported")
    ap.add_argument("--ours", help="our .safetensors output of the same prompts, to compare")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--dtype", default="f32", choices=["f32", "bf16"], help="weights and compute")
    args = ap.parse_args()
    tok, model = pc.load(args.model_dir, args.threads, args.dtype)
    ids = pc.encode(tok, pc.common.read_jsonl(args.prompts))
    pad = pc.pad_id(tok)
    tokens = sum(len(i) for i in ids)
    per = {}
    best = None
    for bs in [int(b) for b in args.batch_sizes.split(",")]:
        states, secs = run(model.model, ids, bs, pad)
        per[bs] = tokens / secs
        print(f"peer hidden: batch {bs}: {tokens} tokens in {secs:.2f} s, {tokens / secs:.1f} tokens/s", file=sys.stderr)
        if best is None or secs < best[1]:
            best = (bs, secs, states)
    bs, secs, states = best
    res = {"batch_size": bs, "tokens": tokens, "seconds": secs, "tok_s": tokens / secs,
           "lengths": [len(i) for i in ids], "shared": shared_prefix_len(ids), "per_batch_size": per,
           "threads": torch.get_num_threads()}
    if args.ours:
        res["check"] = check(args.ours, ids, states)
    print(json.dumps(res))


if __name__ == "__main__":
    main()
