#!/usr/bin/env python3
"""The peer of `safety-layers generate`: batched greedy `model.generate` (transformers), the
same prompts (Alpaca template), prompts sorted longest first and left-padded, stopping each row
at EOS. Times the generation loop only (not loading, tokenising, nor one short untimed warm-up).

Prints one JSON line: {"seconds", "prompts", "new_tokens", "tok_s", "check"} where check compares
the new token ids, prompt by prompt, with ours' JSONL output (--ours).
"""
import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import peer_common as pc  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--prompts", required=True, help="JSONL records {instruction[, input]}")
    ap.add_argument("--limit", type=int)
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--ours", help="ours' generate output (JSONL with output_ids), to compare")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--dtype", default="f32", choices=["f32", "bf16"], help="weights and compute")
    args = ap.parse_args()
    tok, model = pc.load(args.model_dir, args.threads, args.dtype)
    recs = pc.common.read_jsonl(args.prompts)[:args.limit]
    ids = pc.encode(tok, recs)
    pad = pc.pad_id(tok)
    pc.warm_up(model, ids, pad)
    outs, secs = pc.generate(model, ids, args.batch_size, args.max_new_tokens, pc.eos_ids(model), pad)
    new = sum(len(o) for o in outs)
    res = {"seconds": secs, "prompts": len(ids), "new_tokens": new, "tok_s": new / secs}
    if args.ours:
        ours = [r["output_ids"] for r in pc.common.read_jsonl(args.ours)]
        same = sum(a == b for a, b in zip(ours, outs))
        res["check"] = {"prompts": len(ours), "identical": same if len(ours) == len(outs) else None,
                        "differ": [i for i, (a, b) in enumerate(zip(ours, outs)) if a != b][:10]}
    print(json.dumps(res))


if __name__ == "__main__":
    main()
