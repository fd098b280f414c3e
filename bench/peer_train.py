#!/usr/bin/env python3
"""The peer of `safety-layers finetune`: a plain PyTorch training loop on the same data and
settings. Records {instruction, input, output} in file order, Alpaca template (Input variant when
the input is not empty) + output + the tokenizer's EOS, truncated to --max-len, right-padded to
the longest of each batch; loss on all tokens (transformers' causal-LM loss); AdamW (betas
0.9/0.999, eps 1e-8, no weight decay, constant LR,
gradient norm clipped at 1.0 as transformers' Trainer does; torch's fused CPU kernel when it has one).
--freeze I-J: SPPFT, requires_grad False on the attention and MLP weights of those layers.
--autocast-bf16: the forward pass under torch.autocast("cpu", dtype=torch.bfloat16) (f32 weights,
gradients and AdamW state; linear layers in bf16), the peer of `finetune --mixed-precision bf16`.
Times every step, the first included (ours' tokens/s covers its whole run too).

Prints one JSON line: {"steps", "tokens", "seconds", "tok_s", "losses", "step_tokens", "trainable"}.
"""
import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import peer_common as pc  # noqa: E402

import torch  # noqa: E402


def examples(tok, records, max_len):
    eos = tok.eos_token_id
    out = []
    for r in records:
        ids = tok(pc.common.alpaca(r["instruction"], r.get("input")) + r["output"])["input_ids"] + [eos]
        out.append(ids[:max_len])
    return out


def batch(rows, pad):
    t = max(len(r) for r in rows)
    ids = torch.full((len(rows), t), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), t), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r)
        mask[i, :len(r)] = 1
    labels = ids.masked_fill(mask == 0, -100)
    return ids, mask, labels


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--data", required=True, help="JSON list of {instruction, input, output}")
    ap.add_argument("--steps", type=int, required=True)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--max-len", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--freeze", help="I-J: freeze these layers' attention and MLP weights (SPPFT)")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--autocast-bf16", action="store_true", help="bf16 mixed precision (torch.autocast)")
    args = ap.parse_args()
    tok, model = pc.load(args.model_dir, args.threads)
    model.train()
    if args.freeze:
        first, last = (int(x) for x in args.freeze.split("-"))
        for i in range(first, last + 1):
            layer = model.model.layers[i]
            for p in list(layer.self_attn.parameters()) + list(layer.mlp.parameters()):
                p.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    try:
        opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, fused=True)
    except (RuntimeError, TypeError):
        opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    data = examples(tok, json.load(open(args.data)), args.max_len)
    pad = pc.pad_id(tok)
    losses, step_tokens = [], []
    t0 = time.perf_counter()
    for step in range(args.steps):
        s = (step * args.batch_size) % len(data)
        rows = (data + data)[s:s + args.batch_size]
        ids, mask, labels = batch(rows, pad)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.autocast_bf16):
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        step_tokens.append(int(mask.sum()))
    secs = time.perf_counter() - t0
    tokens = sum(step_tokens)
    print(json.dumps({"steps": args.steps, "tokens": tokens, "seconds": secs, "tok_s": tokens / secs, "losses": losses,
                      "step_tokens": step_tokens, "trainable": sum(p.numel() for p in params),
                      "threads": torch.get_num_threads()}))


if __name__ == "__main__":
    main()
