#!/usr/bin/env python3
"""The peer of `safety-layers locate`: what the paper's code does, in transformers. For each run
(a layer range and alpha, or the unscaled baseline): multiply the q,k,v,o,gate,up,down weights of
the range by alpha in place, greedily generate every prompt (batched `model.generate`, left
padding, max new tokens, stop at EOS), decode the new tokens, judge them with the GCG keyword
list (the same phrases and rule as crates/science/src/judges/mod.rs), then restore the saved weights.
Times the runs only (not loading, tokenising, nor one short untimed warm-up).

--runs: a JSON list of {"range": "I-J" | "baseline", "alpha": A} (the runs ours made, from its
locate.json). Prints one JSON line: {"seconds", "runs": [{"range", "alpha", "refusals",
"seconds", "verdicts", "ids"}], "prompt_tokens", "shared_head"} (the prompts' tokens, chat
template included, and how many of their first tokens all prompts share).
"""
import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import peer_common as pc  # noqa: E402

import torch  # noqa: E402


def scaled_params(model, first, last):
    out = []
    for i in range(first, last + 1):
        layer = model.model.layers[i]
        for name in pc.common.SCALED:
            mod = layer
            for part in name.split("."):
                mod = getattr(mod, part)
            out.append(mod.weight)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--prompts", required=True, help="JSONL records {instruction[, input]}")
    ap.add_argument("--limit", type=int)
    ap.add_argument("--runs", required=True, help="JSON file: [{range, alpha}]")
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    tok, model = pc.load(args.model_dir, args.threads)
    ids = pc.encode(tok, pc.common.read_jsonl(args.prompts)[:args.limit])
    pad, eos = pc.pad_id(tok), pc.eos_ids(model)
    pc.warm_up(model, ids, pad)
    runs = json.load(open(args.runs))
    results = []
    t_all = time.perf_counter()
    for run in runs:
        t0 = time.perf_counter()
        params, saved = [], []
        if run["range"] != "baseline" and run["alpha"] != 1.0:
            first, last = (int(x) for x in run["range"].split("-"))
            params = scaled_params(model, first, last)
            with torch.no_grad():
                for p in params:
                    saved.append(p.detach().clone())
                    p.mul_(run["alpha"])
        outs, _ = pc.generate(model, ids, args.batch_size, args.max_new_tokens, eos, pad)
        with torch.no_grad():
            for p, s in zip(params, saved):
                p.copy_(s)
        verdicts = [pc.common.is_refusal(tok.decode(o, skip_special_tokens=True)) for o in outs]
        secs = time.perf_counter() - t0
        results.append({"range": run["range"], "alpha": run["alpha"], "refusals": sum(verdicts), "seconds": secs,
                        "verdicts": verdicts, "ids": outs})
        print(f"peer locate: {run['range']} @ {run['alpha']}: {sum(verdicts)} refusals, {secs:.1f} s", file=sys.stderr)
    shortest = min(map(len, ids))
    head = next((i for i in range(shortest) if len({x[i] for x in ids}) > 1), shortest)
    print(json.dumps({"seconds": time.perf_counter() - t_all, "runs": results,
                      "prompt_tokens": sum(len(x) for x in ids), "shared_head": head}))


if __name__ == "__main__":
    main()
