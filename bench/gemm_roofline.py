#!/usr/bin/env python3
"""GEMM roofline for a decoder's layer shapes: f32 GFLOP/s of x @ W^T at M rows, for the four
matmuls of one layer as our engine holds them (fused q/k/v, o, fused gate/up, down), with torch
(MKL / oneDNN) and numpy (its bundled BLAS), on all cores. The roofline is the faster library's
rate over the whole sequence of the four (total FLOPs / total time): what the best GEMM this
machine has does on exactly this work.

With --layers L the sequence runs over L layers with distinct weights, streamed from memory as a
decode step streams them (one layer's weights stay in cache; a model's do not).

Prints one JSON line: {"rows", "shapes": [...], "torch": {...}, "numpy": {...}, "roofline_gflops"}.
"""
import argparse
import json
import sys
import time

import numpy as np
import torch


def rate(fn, flops, min_seconds):
    fn()
    n, t0 = 0, time.perf_counter()
    while True:
        fn()
        n += 1
        dt = time.perf_counter() - t0
        if dt >= min_seconds and n >= 3:
            return flops * n / dt / 1e9


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", required=True, help="config.json of the model")
    ap.add_argument("--rows", type=int, nargs="+", default=[512], help="M: tokens in one forward")
    ap.add_argument("--min-seconds", type=float, default=0.5)
    ap.add_argument("--layers", type=int, default=1, help="layers with distinct weights in the sequence")
    args = ap.parse_args()
    c = json.load(open(args.config))
    h, inter = c["hidden_size"], c["intermediate_size"]
    hd = c.get("head_dim") or h // c["num_attention_heads"]
    q, kv = c["num_attention_heads"] * hd, c.get("num_key_value_heads", c["num_attention_heads"]) * hd
    shapes = [("qkv", h, q + 2 * kv), ("o", q, h), ("gate_up", h, 2 * inter), ("down", inter, h)]
    out = {"threads": torch.get_num_threads(), "results": []}
    for m in args.rows:
        g = torch.Generator().manual_seed(0)
        xs = {k: torch.randn(m, k, generator=g) for _, k, _ in shapes}
        layers = [[torch.randn(n, k, generator=g) for _, k, n in shapes] for _ in range(args.layers)]
        ws = layers[0]
        xn = {k: v.numpy() for k, v in xs.items()}
        layers_n = [[w.numpy() for w in ws_l] for ws_l in layers]
        wn = layers_n[0]
        total = args.layers * sum(2 * m * k * n for _, k, n in shapes)
        row = {"rows": m, "torch": {}, "numpy": {}}
        for (name, k, n), w, w_np in zip(shapes, ws, wn):
            f = 2 * m * k * n
            row["torch"][f"{name} {m}x{k}x{n}"] = rate(lambda: torch.nn.functional.linear(xs[k], w), f, args.min_seconds)
            row["numpy"][f"{name} {m}x{k}x{n}"] = rate(lambda: xn[k] @ w_np.T, f, args.min_seconds)

        def layer_t():
            for ws_l in layers:
                for (_, k, _), w in zip(shapes, ws_l):
                    torch.nn.functional.linear(xs[k], w)

        def layer_n():
            for wn_l in layers_n:
                for (_, k, _), w in zip(shapes, wn_l):
                    xn[k] @ w.T

        row["torch"]["layer"] = rate(layer_t, total, args.min_seconds)
        row["numpy"]["layer"] = rate(layer_n, total, args.min_seconds)
        row["roofline_gflops"] = max(row["torch"]["layer"], row["numpy"]["layer"])
        print(f"gemm M={m}: torch {row['torch']['layer']:.1f} GF/s, numpy {row['numpy']['layer']:.1f} GF/s (sequence of {args.layers} layer(s))", file=sys.stderr)
        out["results"].append(row)
    out["roofline_gflops"] = max(r["roofline_gflops"] for r in out["results"])
    print(json.dumps(out))


if __name__ == "__main__":
    main()
