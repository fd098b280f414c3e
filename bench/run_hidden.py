#!/usr/bin/env python3
"""Benchmark 1: last-token hidden states of every layer, SmolLM2-135M-Instruct in f32, on the
200 prompts of `cosine` (paper-normal + paper-malicious, Alpaca template).

ours: `safety-layers hidden` on the GGUF (dequantised to f32 at load).
peer: transformers output_hidden_states on the same weights (`convert --dtype f32`).
Each side runs at its best batch size of the same candidates (each timed once first; ours can be
fixed with --batch-size).
Alternates ours / peer for --reps repetitions; tok/s are in-process (model loading excluded on
both sides); whole-process wall and peak RSS come from /usr/bin/time -v. Then a GEMM probe at the
shapes and row count of our batches gives the roofline: ours as a share of it counts the FLOPs
of the 30 decoder layers actually computed (no lm_head; the prompts' shared template head once),
on real tokens (and with padding).
Every repetition checks that both sides saw the same token ids and agree on the hidden states.

  bench/run_hidden.py            # the full benchmark (run on a quiet machine)
  bench/run_hidden.py --quick    # 8 prompts, 1 repetition: checks the script
"""
import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as c  # noqa: E402


def attn(heads, hd, queries, keys_before):
    """Score and weighted-sum FLOPs of `queries` causal queries after `keys_before` keys."""
    return heads * 2 * 2 * hd * sum(keys_before + q + 1 for q in range(queries))


def flops(lengths, batch_size, cfg, shared=0):
    """(useful, computed, real rows per batch, naive): the FLOPs of the decoder layers.
    useful = real tokens, causal attention, the prompts' shared head of `shared` tokens once (ours
    computes it once and copies its keys/values to every row); computed = what our left-padded
    batches, sorted longest first, multiply: the projections on real tokens only (ours skips
    padding rows there since 2026-12-03; before, they counted T per row), attention's full
    T x (shared + T) scores as an upper bound; rows = real rows per batch (the projections' M);
    naive = every token of every prompt, causal (what a peer without the shared head must do at
    least)."""
    proj, heads, hd = c.layer_flops(cfg)
    n_layers = cfg["num_hidden_layers"]
    naive = sum(n_layers * (n * proj + attn(heads, hd, n, 0)) for n in lengths)
    head = n_layers * (shared * proj + attn(heads, hd, shared, 0))
    useful = head + sum(n_layers * ((n - shared) * proj + attn(heads, hd, n - shared, shared)) for n in lengths)
    order = sorted((n - shared for n in lengths), reverse=True)
    computed, rows = head, []
    for s in range(0, len(order), batch_size):
        chunk = order[s:s + batch_size]
        t = chunk[0]
        rows.append(sum(chunk))
        computed += n_layers * (sum(chunk) * proj + len(chunk) * heads * 2 * 2 * hd * t * (shared + t))
    return useful, computed, rows, naive


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    c.common_args(ap)
    ap.add_argument("--prompts", type=int, default=None, help="first N of the 200 (default 200; 8 with --quick)")
    ap.add_argument("--batch-size", type=int, default=None,
                    help="ours (default: its best of the peer's candidates, each timed once first)")
    ap.add_argument("--peer-batch-sizes", default=None, help="candidates for the peer (default 1,4,8,16,32; 4,8 with --quick)")
    ap.add_argument("--candle-probe", action="store_true", help="also run crates/engine/examples/gemm_probe.rs and record its output")
    args = ap.parse_args()
    reps = c.reps_of(args)
    n = args.prompts or (8 if args.quick else 200)
    cands = args.peer_batch_sizes or ("4,8" if args.quick else "1,4,8,16,32")

    ours_bin = c.ensure_binary(not args.no_build)
    model_dir = c.ensure_converted()
    py = c.peer_python()
    cfg = json.load(open(model_dir / "config.json"))
    prompts = c.prompt_file(f"cosine{n}", c.cosine_prompts()[:n])
    ours_out = c.WORK / "hidden_ours.safetensors"
    peer_script = c.BENCH / "peer_hidden.py"

    if "," in cands:
        cal = c.timed([py, peer_script, "--model-dir", model_dir, "--prompts", prompts, "--batch-sizes", cands,
                       "--threads", args.peer_threads], "peer batch sizes").last_json()
        peer_bs = cal["batch_size"]
        cal_line = ", ".join(f"{b}: {v:.0f}" for b, v in cal["per_batch_size"].items())
    else:
        peer_bs, cal_line = int(cands), "not calibrated"
    print(f"peer batch size: {peer_bs} ({cal_line} tok/s)", file=sys.stderr)
    if args.batch_size:
        ours_bs, ours_cal = args.batch_size, "fixed by --batch-size"
    else:
        per = {}
        for b in cands.split(","):
            o = c.timed([ours_bin, "hidden", "--model", c.MODEL, "--prompts", prompts, "--batch-size", b,
                         "--out", ours_out], f"ours batch size {b}")
            per[int(b)] = c.tokens_per_s_line(o.stderr, "hidden")["tok_s"]
        ours_bs = max(per, key=per.get)
        ours_cal = f"its best of {cands}: " + ", ".join(f"{b}: {v:.0f}" for b, v in per.items()) + " tok/s"
    print(f"ours batch size: {ours_bs} ({ours_cal})", file=sys.stderr)

    o_toks, p_toks, o_wall, p_wall, o_rss, p_rss, checks, o_secs = [], [], [], [], [], [], [], []
    for r in range(reps):
        o = c.timed([ours_bin, "hidden", "--model", c.MODEL, "--prompts", prompts, "--batch-size", ours_bs,
                     "--out", ours_out], f"ours {r + 1}/{reps}")
        line = c.tokens_per_s_line(o.stderr, "hidden")
        p = c.timed([py, peer_script, "--model-dir", model_dir, "--prompts", prompts, "--batch-sizes", peer_bs,
                     "--ours", ours_out, "--threads", args.peer_threads], f"peer {r + 1}/{reps}")
        res = p.last_json()
        if line["tokens"] != res["tokens"]:
            sys.exit(f"token counts differ: ours {line['tokens']}, peer {res['tokens']}")
        o_toks.append(line["tok_s"]); o_secs.append(line["seconds"]); p_toks.append(res["tok_s"])
        o_wall.append(o.wall); p_wall.append(p.wall); o_rss.append(o.rss_kib / 1024); p_rss.append(p.rss_kib / 1024)
        checks.append(res["check"])
        lengths = res["lengths"]

    bad = [k for k in checks if not k.get("ids_equal") or k.get("max_rel_err", 1.0) > 1e-3]
    shared = res.get("shared", 0)
    useful, computed, rows, naive = flops(lengths, ours_bs, cfg, shared)
    m = int(statistics.median(rows))
    g = c.timed([py, c.BENCH / "gemm_roofline.py", "--config", model_dir / "config.json", "--rows", m,
                 "--min-seconds", 0.05 if args.quick else 0.5], "gemm roofline").last_json()
    roof = g["roofline_gflops"]
    sec = statistics.median(o_secs)
    useful_gf, computed_gf = useful / sec / 1e9, computed / sec / 1e9
    lines = [
        f"SmolLM2-135M-Instruct f32, {n} prompts ({sum(lengths)} tokens, Alpaca), {reps} repetitions alternating; "
        f"ours batch {ours_bs} ({ours_cal}), peer batch {peer_bs} (its best of {cands}: {cal_line} tok/s).", "",
        c.table([("hidden states, tok/s in-process", "higher", o_toks, p_toks),
                 ("whole process, wall s", "lower", o_wall, p_wall),
                 ("whole process, peak RSS MiB", "lower", o_rss, p_rss)]), "",
        f"- same token ids and hidden states (max relative error <= 1e-3) in every repetition: "
        f"{'yes' if not bad else 'NO: ' + json.dumps(bad)}; largest error {max(k.get('max_rel_err', 0) for k in checks):.2e}",
        f"- GEMM roofline (best of torch / numpy on the layer's four matmuls at M = {m} rows, the median "
        f"real rows of our batches): {roof:.1f} GFLOP/s (torch {g['results'][0]['torch']['layer']:.1f}, "
        f"numpy {g['results'][0]['numpy']['layer']:.1f})",
        f"- the prompts share their first {shared} tokens (the Alpaca head): ours computes them once, so the "
        f"{cfg['num_hidden_layers']} layers need {useful / 1e9:.1f} GFLOP on real tokens instead of {naive / 1e9:.1f} "
        f"GFLOP token by token ({naive / useful:.2f}x less work)",
        f"- ours at its median time {sec:.2f} s: {useful / 1e9:.1f} GFLOP = {useful_gf:.1f} GFLOP/s = "
        f"{100 * useful_gf / roof:.0f}% of the roofline; counting what the batches compute (attention's padded scores) "
        f"({computed / 1e9:.1f} GFLOP): {computed_gf:.1f} GFLOP/s = {100 * computed_gf / roof:.0f}%",
        "- per-shape GEMM GFLOP/s: torch " + ", ".join(f"{k} {v:.1f}" for k, v in g["results"][0]["torch"].items())
        + "; numpy " + ", ".join(f"{k} {v:.1f}" for k, v in g["results"][0]["numpy"].items()),
    ]
    if args.candle_probe:
        cp = c.sh(["cargo", "run", "--release", "-q", "-p", "sl-engine", "--example", "gemm_probe"], cwd=c.ROOT,
                  capture_output=True, text=True)
        lines += ["- candle (our engine's matmul), crates/engine/examples/gemm_probe.rs:", "```", cp.stdout.strip(), "```"]
    c.record("hidden states (benchmark 1)", args, lines)
    if bad:
        sys.exit("the two sides disagree: see above")


if __name__ == "__main__":
    main()
