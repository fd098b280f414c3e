#!/usr/bin/env python3
"""Benchmark 2: batched greedy generation, 128 over-rejection prompts (D_o) x 16 new tokens,
SmolLM2-135M-Instruct in f32, Alpaca template.

ours: `safety-layers generate` on the GGUF.  peer: transformers `model.generate` on the same
weights (`convert --dtype f32`). Both stop a row at EOS. Alternates ours / peer for --reps
repetitions; seconds are in-process (generation only, model loading excluded on both sides),
whole-process wall and peak RSS from /usr/bin/time -v. Each repetition checks that the two
sides produced the same tokens, prompt by prompt.

Each side runs at its best batch size of the same candidates (--batch-sizes, each timed once
first); --batch-size / --peer-batch-size pin them (blocks before 2026-12-03 13:00 UTC pinned both at 16).

  bench/run_generate.py            # the full benchmark (run on a quiet machine)
  bench/run_generate.py --quick    # 6 prompts x 4 tokens, 1 repetition: checks the script
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as c  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    c.common_args(ap)
    ap.add_argument("--prompts", type=int, default=None, help="first N of D_o (default 128; 6 with --quick)")
    ap.add_argument("--max-new-tokens", type=int, default=None, help="default 16; 4 with --quick")
    ap.add_argument("--batch-size", type=int, default=None,
                    help="ours (default: its best of --batch-sizes, each timed once first)")
    ap.add_argument("--peer-batch-size", type=int, default=None, help="the peer's (default: its best, likewise)")
    ap.add_argument("--batch-sizes", default=None,
                    help="candidates each side picks its best from (default 16,32,64,128; 2,4 with --quick)")
    args = ap.parse_args()
    reps = c.reps_of(args)
    n = args.prompts or (6 if args.quick else 128)
    new = args.max_new_tokens or (4 if args.quick else 16)

    ours_bin = c.ensure_binary(not args.no_build)
    model_dir = c.ensure_converted()
    py = c.peer_python()
    prompts = c.prompt_file("over_rejection", c.over_rejection_prompts())
    ours_out = c.WORK / "generate_ours.jsonl"

    def ours(bs, label):
        o = c.timed([ours_bin, "generate", "--model", c.MODEL, "--prompts", prompts, "--limit", n,
                     "--max-new-tokens", new, "--batch-size", bs, "--out", ours_out], label)
        return o, c.tokens_per_s_line(o.stderr, "generate (new tokens)")

    def peer(bs, label):
        p = c.timed([py, c.BENCH / "peer_generate.py", "--model-dir", model_dir, "--prompts", prompts, "--limit", n,
                     "--max-new-tokens", new, "--batch-size", bs, "--ours", ours_out,
                     "--threads", args.peer_threads], label)
        return p, p.last_json()

    # Each side at its best batch size of the same candidates (a user picks theirs), unless pinned.
    cands = [int(b) for b in (args.batch_sizes or ("2,4" if args.quick else "16,32,64,128")).split(",")]
    cal = {}
    ours_bs, peer_bs = args.batch_size, args.peer_batch_size
    if ours_bs is None:
        per = {b: ours(b, f"ours batch size {b}")[1]["seconds"] for b in cands}
        ours_bs, cal["ours"] = min(per, key=per.get), per
    if peer_bs is None:
        # The peer's check compares with ours' last output, so ours runs at its own best first.
        ours(ours_bs, "ours (for the peer's check)")
        per = {b: peer(b, f"peer batch size {b}")[1]["seconds"] for b in cands}
        peer_bs, cal["peer"] = min(per, key=per.get), per

    o_sec, p_sec, o_wall, p_wall, o_rss, p_rss, same, o_new, p_new = [], [], [], [], [], [], [], [], []
    for r in range(reps):
        o, line = ours(ours_bs, f"ours {r + 1}/{reps}")
        p, res = peer(peer_bs, f"peer {r + 1}/{reps}")
        o_sec.append(line["seconds"]); p_sec.append(res["seconds"]); o_new.append(line["tokens"]); p_new.append(res["new_tokens"])
        o_wall.append(o.wall); p_wall.append(p.wall); o_rss.append(o.rss_kib / 1024); p_rss.append(p.rss_kib / 1024)
        same.append(res["check"])

    ident = [k["identical"] for k in same]
    lines = [
        f"SmolLM2-135M-Instruct f32, {n} D_o prompts x {new} greedy new tokens (stop at EOS), Alpaca; {reps} repetitions "
        f"alternating; ours batch {ours_bs}, peer batch {peer_bs}"
        + "".join(f" ({side}'s best of " + ", ".join(f"{b}: {sec:.2f} s" for b, sec in per.items()) + ")"
                  for side, per in cal.items())
        + f". New tokens: ours {o_new[-1]}, "
        f"peer {p_new[-1]} (both count the EOS that ends a row).", "",
        c.table([("generation, s in-process", "lower", o_sec, p_sec),
                 ("prompts/s in-process", "higher", [n / s for s in o_sec], [n / s for s in p_sec]),
                 ("whole process, wall s", "lower", o_wall, p_wall),
                 ("whole process, peak RSS MiB", "lower", o_rss, p_rss)]), "",
        f"- identical new tokens, prompt by prompt: {min(ident)} of {n} in every repetition"
        + ("" if min(ident) == n else f" (first differing prompts: {same[-1]['differ']})"),
    ]
    c.record("generation (benchmark 2)", args, lines)


if __name__ == "__main__":
    main()
