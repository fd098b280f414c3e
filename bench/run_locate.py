#!/usr/bin/env python3
"""Benchmark 3: localisation, SmolLM2-135M-Instruct in f32: the paper's bound sweep over the
first 200 over-rejection prompts (D_o) x 16 greedy tokens at a fixed alpha.

Three arms on identical work, alternating, --reps repetitions:
  ours          `safety-layers locate` (defaults: early stop on, lower-layer prefix cache off)
  transformers  the paper's loop: for each run ours made (its locate.json: baseline + every range
                tried), scale the range's weights in place, model.generate every prompt, judge
                with the same GCG keyword rule, restore the weights
  ours-cache    `safety-layers locate --prefix-cache` (the layers below each lower bound reused)
The refusal count of every run must be equal across all three (and so the chosen range); the
runner says which prompts differ otherwise and exits non-zero. It also reports how many responses
have the same tokens in ours and the peer (up to where ours stopped early on a decided verdict). Seconds are in-process (loading
excluded): locate.json's `seconds` for ours, the loop's time for the peer. With --span 1 the
sweep is about 5 ranges (3 upper, 2 new lower) plus the baseline; the paper's is --span 2.

  bench/run_locate.py            # the full benchmark (run on a quiet machine)
  bench/run_locate.py --quick    # 4 prompts x 4 tokens, 1 repetition: checks the script
"""
import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as c  # noqa: E402


def ours_runs(out_dir):
    doc = json.load(open(out_dir / "locate.json"))
    runs = []
    for r in doc["runs"]:
        resp = c.read_jsonl(out_dir / r["responses"])
        runs.append({"range": r["range"], "alpha": r["alpha"], "refusals": r["refusals"],
                     "verdicts": [x["refusal"] for x in resp],
                     "ids": [(x["output_ids"], x["stop"] == "caller") for x in resp]})
    return doc, runs


def same_tokens(ours, peer):
    """Prompts whose new tokens agree: exactly, or up to where ours stopped early (its judge had
    decided, so it generated no further)."""
    return sum((p[:len(o)] == o) if early else (p == o) for (o, early), p in zip(ours, peer))


def roofline_lines(args, py, model_dir, peer, ours_s, peer_s):
    """The sweep's FLOPs and what the best GEMM here does on its shapes: the time floor they set,
    to say whether a lead over the loop is bounded by the machine or by the code."""
    cfg = json.load(open(model_dir / "config.json"))
    layers = cfg["num_hidden_layers"]
    per_token = layers * c.layer_flops(cfg)[0]
    head = 2 * cfg["hidden_size"] * cfg["vocab_size"]
    runs, prompts = len(peer["runs"]), len(peer["runs"][0]["ids"])
    # The prompts' shared head (chat template) is computed once a run: the rest is the prefill's work.
    prefill_tokens = peer["prompt_tokens"] - (prompts - 1) * peer["shared_head"]
    prefill = runs * prefill_tokens * per_token
    # A prompt that gets t new tokens: its prefill's lm_head row, then t - 1 tokens fed back.
    new = [len(ids) for r in peer["runs"] for ids in r["ids"]]
    decode = sum(t * head + max(t - 1, 0) * per_token for t in new)
    prefill_rows = args.batch_size * max(1, round(prefill_tokens / prompts))
    g = c.timed([py, c.BENCH / "gemm_roofline.py", "--config", model_dir / "config.json", "--rows", args.batch_size,
                 prefill_rows, "--layers", layers, "--min-seconds", 0.05 if args.quick else 1.0],
                "gemm roofline at the decode and prefill shapes").last_json()
    (rd, rp) = g["results"]
    floor = decode / (rd["roofline_gflops"] * 1e9) + prefill / (rp["roofline_gflops"] * 1e9)
    return [
        f"- work (the peer's tokens; the four projections and the lm_head, attention's 1-2% left out): decode "
        f"{decode / 1e12:.2f} TFLOP ({sum(new)} new tokens), prefill {prefill / 1e12:.2f} TFLOP ({prefill_tokens} tokens "
        f"a run once the {peer['shared_head']}-token shared head is counted once, of {peer['prompt_tokens']})",
        f"- GEMM roofline (best of torch / numpy, x @ W^T over the {layers} layers' distinct weights in turn, "
        f"streamed as a forward streams them): {rd['roofline_gflops']:.1f} GFLOP/s at M = {args.batch_size} (a decode "
        f"step; torch {rd['torch']['layer']:.1f}, numpy {rd['numpy']['layer']:.1f}), {rp['roofline_gflops']:.1f} at "
        f"M = {prefill_rows} (a prefill batch)",
        f"- floor at those rates: {floor:.1f} s, {peer_s / floor:.2f}x the loop's {peer_s:.0f} s; 3x needs "
        f"{peer_s / 3:.1f} s. Ours {ours_s:.1f} s is {floor / ours_s:.2f} of the floor's speed (ours stops a response "
        f"early once its verdict is decided, which the floor does not count)",
    ]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    c.common_args(ap, reps=3)
    ap.add_argument("--prompts", type=int, default=None, help="first N of D_o (default 200; 4 with --quick)")
    ap.add_argument("--max-new-tokens", type=int, default=None, help="default 16; 4 with --quick")
    ap.add_argument("--initial", default="6-12", help="initial range I-J of the sweep")
    ap.add_argument("--alpha", type=float, default=1.2)
    ap.add_argument("--span", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=32, help="ours")
    ap.add_argument("--peer-batch-size", type=int, default=32)
    args = ap.parse_args()
    reps = c.reps_of(args)
    n = args.prompts or (4 if args.quick else 200)
    new = args.max_new_tokens or (4 if args.quick else 16)

    ours_bin = c.ensure_binary(not args.no_build)
    model_dir = c.ensure_converted()
    py = c.peer_python()
    prompts = c.prompt_file("over_rejection", c.over_rejection_prompts())
    runs_file = c.WORK / "locate_runs.json"
    base = [ours_bin, "locate", "--model", c.MODEL, "--over-rejection", prompts, "--limit", n, "--initial", args.initial,
            "--alpha", args.alpha, "--span", args.span, "--max-new-tokens", new, "--batch-size", args.batch_size,
            # The peer's loop judges with the GCG keyword list, as the paper does.
            "--judge", "gcg"]

    arms = {"ours": [], "transformers": [], "ours-cache": []}
    walls = {k: [] for k in arms}
    rss = {k: [] for k in arms}
    mismatches, n_runs, sweep = [], None, None
    tokens_same, tokens_all = 0, 0
    for r in range(reps):
        out = c.WORK / "locate_ours"
        o = c.timed(base + ["--out", out], f"ours {r + 1}/{reps}")
        doc, runs = ours_runs(out)
        json.dump([{"range": x["range"], "alpha": x["alpha"]} for x in runs], open(runs_file, "w"))
        p = c.timed([py, c.BENCH / "peer_locate.py", "--model-dir", model_dir, "--prompts", prompts, "--limit", n,
                     "--runs", runs_file, "--max-new-tokens", new, "--batch-size", args.peer_batch_size,
                     "--threads", args.peer_threads], f"transformers {r + 1}/{reps}")
        peer = p.last_json()
        out_nc = c.WORK / "locate_ours_cache"
        q = c.timed(base + ["--prefix-cache", "--out", out_nc], f"ours-cache {r + 1}/{reps}")
        doc_nc, runs_nc = ours_runs(out_nc)
        for arm, t, secs in (("ours", o, doc["seconds"]), ("transformers", p, peer["seconds"]), ("ours-cache", q, doc_nc["seconds"])):
            arms[arm].append(secs); walls[arm].append(t.wall); rss[arm].append(t.rss_kib / 1024)
        by_key = lambda rs: {(x["range"], x["alpha"]): x for x in rs}  # noqa: E731
        a, b, d = by_key(runs), by_key(peer["runs"]), by_key(runs_nc)
        for k in set(a) & set(b):
            tokens_same += same_tokens(a[k]["ids"], b[k]["ids"])
            tokens_all += len(a[k]["ids"])
        for k in sorted(set(a) | set(b) | set(d), key=str):
            counts = [x[k]["refusals"] if k in x else None for x in (a, b, d)]
            if len(set(counts)) != 1:
                diff = [i for i, (u, v) in enumerate(zip(a.get(k, {}).get("verdicts", []), b.get(k, {}).get("verdicts", []))) if u != v]
                mismatches.append(f"repetition {r + 1}, run {k[0]} @ {k[1]}: ours {counts[0]}, transformers {counts[1]}, "
                                  f"ours-cache {counts[2]}; prompts judged differently by ours and transformers: {diff[:10]}")
        n_runs = len(runs)
        all_zero = all(x["refusals"] == 0 for x in runs)
        sweep = ("baseline " + str(doc["baseline"]) + "; upper " + " ".join(f"[{t[0]['first']},{t[0]['last']}] {t[1]}" for t in doc["upper_sweep"]["tried"])
                 + "; lower " + " ".join(f"[{t[0]['first']},{t[0]['last']}] {t[1]}" for t in doc["lower_sweep"]["tried"])
                 + f"; range {doc['range']['first']}-{doc['range']['last']}")

    def rows(peer):
        return [(f"localisation, s in-process", "lower", arms["ours"], arms[peer]),
                ("whole process, wall s", "lower", walls["ours"], walls[peer]),
                ("whole process, peak RSS MiB", "lower", rss["ours"], rss[peer])]

    lines = [
        f"SmolLM2-135M-Instruct f32, {n} D_o prompts x {new} greedy tokens, alpha {args.alpha}, initial {args.initial}, "
        f"span {args.span}: {n_runs} runs (baseline + {n_runs - 1} ranges); {reps} repetitions alternating; "
        f"ours batch {args.batch_size}, transformers batch {args.peer_batch_size}.", "",
        "ours vs the transformers loop:", "", c.table(rows("transformers"), "ours", "transformers"), "",
        "ours vs ours with the lower-layer prefix cache:", "", c.table(rows("ours-cache"), "ours", "ours-cache"), "",
        f"- sweep (ours): {sweep}",
        "- refusal counts equal in every run of every repetition across the three arms: "
        + ("yes" if not mismatches else "NO:\n  - " + "\n  - ".join(mismatches)),
    ]
    lines.append(f"- identical new tokens, ours vs transformers (up to ours' early stop), over every run and prompt: "
                 f"{tokens_same} of {tokens_all}")
    lines += roofline_lines(args, py, model_dir, peer, statistics.median(arms["ours"]),
                            statistics.median(arms["transformers"]))
    if all_zero:
        lines.append("- every run refused 0 prompts (SmolLM2-135M-Instruct is not safety-aligned), so equal counts say "
                     "little; the token comparison is the stronger check")
    c.record("localisation (benchmark 3)", args, lines)
    if mismatches:
        sys.exit("refusal counts differ: see above")


if __name__ == "__main__":
    main()
