#!/usr/bin/env python3
"""Benchmark 4: training tokens/s and peak RSS, SmolLM2-135M-Instruct in f32, batch 4, 128
tokens, AdamW at a constant LR 1e-4, on the paper's D_N (Normal_dataset.json): full fine-tuning
and SPPFT (attention and MLP of --freeze frozen).

Four arms, alternating, --reps repetitions: ours full, PyTorch full, ours SPPFT, PyTorch SPPFT.
ours: `safety-layers finetune ... --max-steps N` (its closing tokens/s line; train_log.jsonl for
the tokens and losses). PyTorch: bench/peer_train.py, the same data in file order and settings.
Whole-process wall and peak RSS from /usr/bin/time -v. If our CLI has --no-shuffle / --holdout,
the runner asks for file order and no hold-out so both sides see the same batches (then the
first step's loss must agree); otherwise the batches differ and only the token counts are
comparable. If `safety-layers finetune` does not exist yet the benchmark is skipped
(--peer-only runs the PyTorch arms alone).

  bench/run_train.py            # the full benchmark (run on a quiet machine)
  bench/run_train.py --quick    # 2 steps, batch 2, 32 tokens, 1 repetition: checks the script
"""
import argparse
import json
import re
import shutil
import subprocess
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as c  # noqa: E402


def finetune_help(ours_bin):
    r = subprocess.run([str(ours_bin), "finetune", "--help"], env=c.env(), capture_output=True, text=True)
    return r.stdout if r.returncode == 0 else None


def train_log(out_dir, step_cap):
    """(steps, tokens, first loss) from train_log.jsonl; `tokens` may be per step or running (a
    running count passes what one step can hold, step_cap = batch x max-len)."""
    p = out_dir / "train_log.jsonl"
    if not p.exists():
        return None
    rows = [r for r in c.read_jsonl(p) if "step" in r]
    if not rows:
        return None
    toks = [r.get("tokens", 0) for r in rows]
    running = all(b > a for a, b in zip(toks, toks[1:])) and toks[-1] > step_cap
    return {"steps": len(rows), "tokens": toks[-1] if running else sum(toks), "first_loss": rows[0].get("loss")}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    c.common_args(ap, reps=3)
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default 20; 2 with --quick)")
    ap.add_argument("--batch-size", type=int, default=None, help="default 4; 2 with --quick")
    ap.add_argument("--max-len", type=int, default=None, help="default 128; 32 with --quick")
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--freeze", default="6-12", help="the SPPFT arms' frozen range I-J")
    ap.add_argument("--data", default=None, help="default: ../shared/data/paper/Normal_dataset.json")
    ap.add_argument("--peer-only", action="store_true", help="run the PyTorch arms only")
    args = ap.parse_args()
    reps = c.reps_of(args)
    steps = args.steps or (2 if args.quick else 20)
    bs = args.batch_size or (2 if args.quick else 4)
    max_len = args.max_len or (32 if args.quick else 128)
    data = Path(args.data) if args.data else c.data_dir() / "paper" / "Normal_dataset.json"

    ours_bin = c.ensure_binary(not args.no_build)
    help_text = finetune_help(ours_bin)
    if help_text is None and not args.peer_only:
        print("safety-layers has no `finetune` command yet: skipping the training benchmark "
              "(--peer-only runs the PyTorch arms alone)")
        return
    model_dir = c.ensure_converted()
    py = c.peer_python()
    extra = []
    same_batches = False
    if help_text:
        if "--no-shuffle" in help_text:
            extra.append("--no-shuffle")
        if "--holdout" in help_text:
            extra += ["--holdout", "0"]
        same_batches = "--no-shuffle" in extra and "--holdout" in extra

    # ckpt: ours only, full fine-tuning with --grad-checkpointing (its time and memory against
    # our own full run).
    # bf16: full fine-tuning in bf16 mixed precision on both sides (ours --mixed-precision bf16,
    # PyTorch torch.autocast bf16).
    arms = (["full", "sppft"] + (["bf16"] if help_text and "--mixed-precision" in help_text else [])
            + (["ckpt"] if help_text and "--grad-checkpointing" in help_text else []))
    o_tps, p_tps = {a: [] for a in arms}, {a: [] for a in arms}
    o_rss, p_rss = {a: [] for a in arms}, {a: [] for a in arms}
    o_wall, p_wall = {a: [] for a in arms}, {a: [] for a in arms}
    notes = []
    params = None  # (trainable, frozen) as our full run reports them
    for r in range(reps):
        for arm in arms:
            freeze = ["--freeze", args.freeze] if arm == "sppft" else []
            ckpt = ["--grad-checkpointing"] if arm == "ckpt" else []
            ckpt += ["--mixed-precision", "bf16"] if arm == "bf16" else []
            peer_mp = ["--autocast-bf16"] if arm == "bf16" else []
            if help_text:
                out = c.WORK / f"finetune_ours_{arm}"
                shutil.rmtree(out, ignore_errors=True)
                o = c.timed([ours_bin, "finetune", "--model", c.MODEL, "--data", data, "--out", out, *freeze,
                             "--epochs", 1, "--lr", args.lr, "--batch-size", bs, "--max-len", max_len,
                             "--lr-schedule", "constant", "--warmup-steps", 0, "--max-steps", steps, "--max-grad-norm", 1, *ckpt, *extra],
                            f"ours {arm} {r + 1}/{reps}")
                m = re.findall(r"([\d.]+) tokens/s", o.stderr + o.stdout)
                log = train_log(out, bs * max_len)
                if not m and not log:
                    sys.exit("ours printed no tokens/s and wrote no train_log.jsonl")
                o_tps[arm].append(float(m[-1]) if m else float("nan"))
                counts = re.findall(r"(\d+) trainable / (\d+) frozen", o.stderr + o.stdout)
                if arm == "full" and counts:
                    params = tuple(int(x) for x in counts[-1])
                o_rss[arm].append(o.rss_kib / 1024); o_wall[arm].append(o.wall)
            if arm == "ckpt":
                continue
            p = c.timed([py, c.BENCH / "peer_train.py", "--model-dir", model_dir, "--data", data, "--steps", steps,
                         "--batch-size", bs, "--max-len", max_len, "--lr", args.lr, "--threads", args.peer_threads, *freeze, *peer_mp],
                        f"pytorch {arm} {r + 1}/{reps}")
            res = p.last_json()
            p_tps[arm].append(res["tok_s"]); p_rss[arm].append(p.rss_kib / 1024); p_wall[arm].append(p.wall)
            if r == 0 and same_batches and log and log["first_loss"] is not None:
                # bf16 on both sides rounds different things (autocast also runs attention and the
                # element-wise ops in bf16): agreement within 0.02 there.
                tol = 2e-2 if arm == "bf16" else 1e-3
                agree = abs(log["first_loss"] - res["losses"][0]) <= tol
                notes.append(f"- {arm}: first-step loss ours {log['first_loss']:.5f}, PyTorch {res['losses'][0]:.5f}: "
                             + (f"agree within {tol:g} (same data, same model)" if agree
                                else f"DIFFER by more than {tol:g} (different data or formatting?)"))
            if r == 0:
                ours_part = (f"ours {log['steps']} steps, {log['tokens']} tokens, first loss {log['first_loss']:.4f}; "
                             if help_text and log else "")
                notes.append(f"- {arm}: {ours_part}PyTorch {res['steps']} steps, {res['tokens']} tokens, first loss "
                             f"{res['losses'][0]:.4f}, {res['trainable']} trainable parameters")

    cfg = json.load(open(model_dir / "config.json"))
    proj, _, _ = c.layer_flops(cfg)
    first, last = (int(x) for x in args.freeze.split("-"))
    k, n_layers = last - first + 1, cfg["num_hidden_layers"]
    fwd = n_layers * proj + 2 * cfg["hidden_size"] * cfg["vocab_size"]  # per token: layers + lm_head
    share_bwd = k * proj / (2 * fwd)  # frozen weight gradients / backward matmul work
    share_step = k * proj / (3 * fwd)  # the same / forward + backward matmul work
    rows = []
    for arm in [a for a in arms if a != "ckpt"]:
        rows += [(f"{arm}: tokens/s", "higher", o_tps[arm], p_tps[arm]),
                 (f"{arm}: whole process, peak RSS MiB", "lower", o_rss[arm], p_rss[arm]),
                 (f"{arm}: whole process, wall s", "lower", o_wall[arm], p_wall[arm])]
    speed = lambda d: [s / f for s, f in zip(d["sppft"], d["full"])]  # noqa: E731
    lines = [
        f"SmolLM2-135M-Instruct f32, {data.name}, {steps} steps x batch {bs} x max {max_len} tokens, AdamW lr {args.lr} "
        f"constant; SPPFT freezes layers {args.freeze}; {reps} repetitions alternating "
        f"(ours full, PyTorch full, ours SPPFT, PyTorch SPPFT"
        f"{', ours bf16 mixed precision, PyTorch bf16 autocast' if 'bf16' in arms else ''}"
        f"{', ours with gradient checkpointing' if 'ckpt' in arms else ''}). "
        + ("" if not help_text else "Same batches on both sides (file order, no hold-out)." if same_batches else
           "Our CLI has no --no-shuffle/--holdout: the batches differ, compare the token counts below."), "",
        c.table(rows, "ours", "pytorch") if help_text else
        "\n".join(f"- PyTorch {a}: {c.fmt_stats(p_tps[a])} tokens/s, peak RSS {c.fmt_stats(p_rss[a])} MiB" for a in arms), "",
        *notes,
        f"- SPPFT/full tokens/s: ours {c.fmt_stats(speed(o_tps)) if help_text else '-'}, PyTorch {c.fmt_stats(speed(p_tps))}. "
        f"Freezing {k} of {n_layers} layers removes {100 * share_bwd:.1f}% of the backward matmul FLOPs "
        f"({100 * share_step:.1f}% of forward + backward): the step-time saving to expect at least.",
    ]
    if help_text:
        saving = [1 - f / s for s, f in zip(o_tps["sppft"], o_tps["full"])]
        lines.append(f"- SPPFT step-time saving, ours: {c.fmt_stats([100 * x for x in saving])}% of the full step, "
                     f"{c.fmt_stats([x / share_step for x in saving])}x the frozen matmul share ({100 * share_step:.1f}%; "
                     "target >= 0.7x)")
    if "ckpt" in arms:
        t_ratio = [f / k for f, k in zip(o_tps["full"], o_tps["ckpt"])]
        m_ratio = [k / f for f, k in zip(o_rss["full"], o_rss["ckpt"])]
        lines.append(f"- gradient checkpointing (ours, full fine-tuning): {c.fmt_stats(o_tps['ckpt'])} tokens/s, peak RSS "
                     f"{c.fmt_stats(o_rss['ckpt'])} MiB; time {c.fmt_stats(t_ratio)}x and peak RSS {c.fmt_stats(m_ratio)}x "
                     "our full run's (targets <= 1.35x and <= 0.5x)")
        if params:
            # What no checkpointing can remove: f32 weights and both AdamW moments of every trained
            # parameter live through every step (12 bytes each), and its gradient through backward (4 more).
            trainable, frozen = params
            state = (12 * trainable + 4 * frozen) / 2**20
            with_grads = state + 4 * trainable / 2**20
            full = statistics.median(o_rss["full"])
            lines.append(f"- the fixed training state at these settings: weights and AdamW moments {state:.0f} MiB "
                         f"({state / full:.2f}x the full run's peak RSS), {with_grads:.0f} MiB with the gradients "
                         f"({with_grads / full:.2f}x): a floor for any checkpointing; above it, the checkpointed run's "
                         f"peak is {c.fmt_stats([k - with_grads for k in o_rss['ckpt']])} MiB against the full run's "
                         f"{c.fmt_stats([f - with_grads for f in o_rss['full']])} MiB")
    c.record("training (benchmark 4)" + ("" if help_text else ", PyTorch only"), args, lines)


if __name__ == "__main__":
    main()
