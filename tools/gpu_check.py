#!/usr/bin/env python3
"""The GPU check of issue 15: our `cuda` build against transformers/PyTorch on the same GPU, in
one run that writes one table. Run it through tools/gpu_check.sh on a machine with an NVIDIA GPU,
torch and transformers, and no Rust toolchain (bring the binary built here).

  python3 tools/gpu_check.py --bin PATH --out DIR [--assets DIR] [--budget SECONDS]

(a) parity on the GPU, f32 and bf16, for the 9 family fixtures (tests/fixtures/<family>):
    last-token hidden states of every entry, next-token log-probabilities and 12 greedy tokens
    (EOS does not stop them) against transformers on the same GPU, on identical token ids.
    f32: max |ours - theirs| / max(|theirs|, 1) <= 1e-4 (the CPU tests' tolerance), greedy
    identical. bf16 (as tests/it/bf16.rs): transformers in bf16 (a) and with bf16 weights but
    f32 compute (b); ours must lie within 2 * dist(a, b) + 1e-4 of (a), and agree with (a)'s
    greedy tokens on at least as many prompts as (b) does.
(b) training: 6 AdamW steps of `finetune` on the tiny Llama fixture, full and with layers 1-2
    frozen, on the GPU and on the CPU: losses within 1e-4, frozen tensors bit-identical.
(c) speed, each against transformers on the same GPU in the same run, from in-process timings
    (ours: the command's own timings of its compute, after a warm-up run; theirs: CUDA-synchronised
    wall time after a warm-up batch), on identical token ids:
    - a SmolLM2-135M-shaped checkpoint (SmolLM2's config and tokenizer, random weights written
      here by torch, bf16): hidden-state pass tokens/s (D_o, batch 32) and greedy generation
      tokens/s (256 D_o prompts, 32 new tokens, batch 32);
    - a Llama-3-8B-shaped checkpoint (random weights written here by torch, bf16): the same two,
      and one localisation range: the 731 D_o prompts x 16 greedy tokens with layers 12-16
      scaled by 1.2 (what `locate` runs per range).

Assets (--assets, default gpu/): smollm2/ (config.json, tokenizer.json, tokenizer_config.json,
generation_config.json), llama3/ (tokenizer.json, tokenizer_config.json), do.csv (D_o).
Writes DIR/gpu_check.md and DIR/gpu_check.json after every step, so a run cut short still
leaves what it measured.
"""
import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch
import transformers

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
import peer_common  # noqa: E402  (the bench's peer helpers: the same left padding)

FAMILIES = ["llama", "llama3", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "phi3"]
F32_TOL = 1e-4
# Where both sides run: the GPU (a dry run of the script itself can use the CPU: --device cpu).
DEV, OURS_DEV, OURS_DEV_NAME = "cuda", "cuda", "cuda:0"


def sync():
    if DEV == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
LLAMA3_8B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
    "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
    "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 128256, "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0, "max_position_embeddings": 8192, "tie_word_embeddings": False,
    "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "bos_token_id": 128000, "eos_token_id": [128001, 128009], "hidden_act": "silu",
    "attention_bias": False, "mlp_bias": False, "torch_dtype": "bfloat16",
}


class Report:
    def __init__(self, out):
        self.out, self.rows, self.notes, self.t0 = out, [], [], time.time()

    def row(self, part, item, ours, theirs, measure, verdict):
        self.rows.append(dict(part=part, item=item, ours=ours, theirs=theirs, measure=measure,
                              verdict=verdict))
        print(f"[{time.time() - self.t0:6.1f}s] {part} | {item} | {ours} | {theirs} | {measure} "
              f"| {verdict}", flush=True)
        self.write()

    def note(self, text):
        self.notes.append(text)
        print(text, flush=True)
        self.write()

    def write(self):
        lines = ["| part | item | ours | transformers | measure | verdict |",
                 "|---|---|---|---|---|---|"]
        lines += [f"| {r['part']} | {r['item']} | {r['ours']} | {r['theirs']} | {r['measure']} | "
                  f"{r['verdict']} |" for r in self.rows]
        text = "\n".join(lines + [""] + [f"- {n}" for n in self.notes]) + "\n"
        for name, body in [("gpu_check.md", text),
                           ("gpu_check.json", json.dumps({"rows": self.rows, "notes": self.notes},
                                                         indent=1))]:
            tmp = os.path.join(self.out, name + ".tmp")
            with open(tmp, "w") as f:
                f.write(body)
            os.replace(tmp, os.path.join(self.out, name))


def run(cmd, timeout):
    """Runs our binary; returns (stderr text, seconds). Raises with the output on failure."""
    t0 = time.time()
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {p.returncode}: {p.stderr[-2000:]}")
    return p.stderr, time.time() - t0


def rel_err(got, want):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.max(np.abs(got - want) / np.maximum(np.abs(want), 1.0)))


def read_hidden(path):
    from safetensors import safe_open
    with safe_open(path, "np") as f:
        meta = f.metadata()
        return f.get_tensor("hidden_last"), meta


def torch_single(model, ids, greedy_n, compute_f32=False):
    """Per prompt alone: last-token hidden states of every entry, log-probs, greedy tokens (a
    plain loop without cache, EOS not special)."""
    hidden, logprobs, greedy = [], [], []
    with torch.no_grad():
        for p in ids:
            x = torch.tensor([p], device=DEV)
            out = model(x, output_hidden_states=True)
            hidden.append(np.stack([h[0, -1].float().cpu().numpy() for h in out.hidden_states]))
            logprobs.append(torch.log_softmax(out.logits[0, -1].float(), -1).cpu().numpy())
            seq, new = x, []
            for _ in range(greedy_n):
                nxt = model(seq).logits[0, -1].float().argmax().item()
                new.append(nxt)
                seq = torch.cat([seq, torch.tensor([[nxt]], device=DEV)], 1)
            greedy.append(new)
    return hidden, logprobs, greedy


def parity(rep, args, work):
    for fam in FAMILIES:
        d = os.path.join(args.repo, "tests", "fixtures", fam)
        exp = json.load(open(os.path.join(d, "expected.json")))
        prompts = os.path.join(work, f"{fam}.json")
        json.dump([{"prompt": t} for t in exp["prompts"]], open(prompts, "w"))
        for dtype in ["f32", "bf16"]:
            item = f"{fam} {dtype}"
            try:
                common = ["--model", d, "--prompts", prompts, "--column", "prompt", "--template",
                          "raw", "--device", OURS_DEV, "--dtype", dtype, "--batch-size", "4"]
                lo = os.path.join(work, f"{fam}-{dtype}.json")
                run([args.bin, "logits", *common, "--greedy", "12", "--out", lo], 120)
                ho = os.path.join(work, f"{fam}-{dtype}.safetensors")
                run([args.bin, "hidden", *common, "--out", ho], 120)
                doc = json.load(open(lo))
                ids = [it["input_ids"] for it in doc["items"]]
                ours_greedy = [it["greedy"] for it in doc["items"]]
                ours_lp = np.load(lo[:-5] + ".npy")
                ours_h, meta = read_hidden(ho)
                if json.loads(meta["precision"]).get("device") != OURS_DEV_NAME:
                    raise RuntimeError(f"ran on {meta['precision']}, not the GPU")
                tdt = torch.float32 if dtype == "f32" else torch.bfloat16
                m = transformers.AutoModelForCausalLM.from_pretrained(
                    d, dtype=tdt, attn_implementation="eager").to(DEV).eval()
                a_h, a_lp, a_g = torch_single(m, ids, 12)
                h_err = max(rel_err(o, a) for o, a in zip(ours_h, a_h))
                lp_err = float(np.max(np.abs(ours_lp - np.stack(a_lp))))
                same = sum(o == a for o, a in zip(ours_greedy, a_g))
                if dtype == "f32":
                    ok = h_err <= F32_TOL and same == len(ids)
                    rep.row("a", item, f"hidden {h_err:.1e}", f"greedy {same}/{len(ids)}",
                            f"logprob max abs diff {lp_err:.1e}", "PASS" if ok else "FAIL")
                else:
                    b = m.float()
                    b_h, _, b_g = torch_single(b, ids, 12)
                    # (b) with bf16 weights: the bf16 model widened after loading.
                    dist = max(rel_err(x, y) for x, y in zip(b_h, a_h))
                    tol = 2 * dist + F32_TOL
                    b_same = sum(x == y for x, y in zip(b_g, a_g))
                    ok = h_err <= tol and same >= b_same
                    rep.row("a", item, f"hidden {h_err:.1e} (tol {tol:.1e})",
                            f"greedy {same}/{len(ids)} (b: {b_same})",
                            f"logprob max abs diff {lp_err:.1e}", "PASS" if ok else "FAIL")
                del m
                sync()
            except Exception as e:  # one family's failure must not hide the others
                rep.row("a", item, "error", "", str(e)[-300:].replace("|", "/").replace("\n", " "),
                        "FAIL")


def finetune_cmd(args, model, data, out, device, extra=()):
    return [args.bin, "finetune", "--model", model, "--data", data, "--out", out, "--device",
            device, "--epochs", "1", "--lr", "1e-3", "--lr-schedule", "constant", "--batch-size",
            "1", "--grad-accum", "1", "--max-len", "64", "--weight-decay", "0.01",
            "--max-grad-norm", "1.0", "--template", "alpaca", "--train-on-inputs", "true",
            "--holdout", "0", "--no-shuffle", "--limit", "6", *extra]


def losses(out):
    with open(os.path.join(out, "train_log.jsonl")) as f:
        return [json.loads(line)["loss"] for line in f if line.strip()]


def training(rep, args, work):
    """6 AdamW steps on the tiny Llama fixture, full and with layers 1-2 frozen: the GPU run's
    losses against the CPU trainer's, and frozen tensors bit-identical to the input."""
    from safetensors.numpy import load_file
    model = os.path.join(args.repo, "tests", "fixtures", "llama")
    data = os.path.join(args.assets, "normal6.json")
    before = load_file(os.path.join(model, "model.safetensors"))
    for run_name, extra in [("full", []), ("layers 1-2 frozen", ["--freeze", "1-2"])]:
        item = f"tiny llama, 6 steps, {run_name}"
        try:
            outs = {}
            for role, dev in [("device", OURS_DEV), ("cpu", "cpu")]:
                o = os.path.join(work, f"ft-{run_name[:4]}-{role}")
                run(finetune_cmd(args, model, data, o, dev, extra), 300)
                outs[role] = o
            gpu, cpu = losses(outs["device"]), losses(outs["cpu"])
            diff = max(abs(a - b) for a, b in zip(gpu, cpu)) if len(gpu) == len(cpu) else 1e9
            after = load_file(os.path.join(outs["device"], "model.safetensors"))
            frozen = [n for n in before if n.startswith(("model.layers.1.", "model.layers.2."))
                      and ("self_attn" in n or "mlp" in n)] if extra else []
            same = all(np.array_equal(before[n], after[n]) for n in frozen)
            changed = sum(not np.array_equal(before[n], after[n]) for n in before if n in after)
            ok = diff <= 1e-4 and len(gpu) == 6 and same and changed > 0
            rep.row("b", item, f"losses {', '.join(f'{x:.5f}' for x in gpu)}",
                    f"CPU trainer: max loss diff {diff:.1e}",
                    f"{len(frozen)} frozen tensors identical: {same}; {changed} changed",
                    "PASS" if ok else "FAIL")
        except Exception as e:
            rep.row("b", item, "error", "", str(e)[-300:].replace("|", "/").replace("\n", " "),
                    "FAIL")


def train_speed(rep, args, work, d, model):
    """Training tokens/s on `d` (the SmolLM2-shaped checkpoint): ours (`finetune`, f32) against
    a PyTorch loop with AdamW on the same GPU, batch 4, the D_o-free Normal records."""
    data = os.path.join(args.assets, "normal64.json")
    o = os.path.join(work, "ft-speed")
    cmd = [args.bin, "finetune", "--model", d, "--data", data, "--out", o, "--device", OURS_DEV,
           "--epochs", "1", "--lr", "1e-5", "--batch-size", "4", "--max-len", "128",
           "--no-shuffle", "--holdout", "0", "--dtype", "f32"]
    run(cmd, 600)
    log = [json.loads(line) for line in open(os.path.join(o, "train_log.jsonl")) if line.strip()]
    # Steps after the first (warm-up): tokens over their wall time.
    timed = [x for x in log[1:] if "tokens" in x and "seconds" in x]
    if not timed:
        raise RuntimeError(f"train_log.jsonl has no per-step tokens/seconds: {log[:1]}")
    ours = sum(x["tokens"] for x in timed) / sum(x["seconds"] for x in timed)
    # PyTorch: the same number of tokens per step (4 rows of the mean length), random ids.
    per_row = max(2, round(sum(x["tokens"] for x in timed) / len(timed) / 4))
    m32 = model.float().train()
    opt = torch.optim.AdamW(m32.parameters(), lr=1e-5, weight_decay=0.0)
    g = torch.Generator().manual_seed(0)
    n_tok = 0
    for i in range(12):
        if i == 2:
            sync()
            t0 = time.time()
        x = torch.randint(0, m32.config.vocab_size, (4, per_row), generator=g).to(DEV)
        loss = m32(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= 2:
            n_tok += x.numel()
    sync()
    theirs = n_tok / (time.time() - t0)
    rep.row("c", "smollm2-shape training (f32, batch 4)", f"{ours:.0f} tok/s", f"{theirs:.0f} tok/s",
            f"{ours / theirs:.2f}x", "PASS" if ours >= theirs else "MISS (>= 1x)")


def synthetic(cfg, tok_dir, out_dir):
    """A checkpoint with `cfg`'s shape and random weights (transformers' own initialisation,
    on the GPU), written as bf16 safetensors with the tokenizer files beside it. Returns the
    model, left on the GPU for the transformers side."""
    config = transformers.AutoConfig.for_model(
        cfg["model_type"], **{k: v for k, v in cfg.items() if k != "model_type"})
    torch.manual_seed(0)
    with torch.device(DEV):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.eval()
    model.save_pretrained(out_dir, max_shard_size="5GB")
    # The config as given (the saved one spells rope settings in transformers 5's own way).
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(cfg, f, indent=1)
    for f in os.listdir(tok_dir):
        if f.startswith("tokenizer") or f == "generation_config.json":
            shutil.copy(os.path.join(tok_dir, f), out_dir)
    return model


def left_pad(ids, pad):
    """bench/peer_common's left padding (ids and attention mask), on the device."""
    x, mask, _ = peer_common.left_pad(ids, pad)
    return x.to(DEV), mask.to(DEV)


def torch_hidden_speed(model, ids, batch):
    with torch.no_grad():
        x, m = left_pad(ids[:batch], 0)
        model(input_ids=x, attention_mask=m, output_hidden_states=True)  # warm-up
        sync()
        t0 = time.time()
        for i in range(0, len(ids), batch):
            x, m = left_pad(ids[i:i + batch], 0)
            out = model(input_ids=x, attention_mask=m, output_hidden_states=True)
            _ = [h[:, -1].float().cpu() for h in out.hidden_states]
        sync()
        return sum(len(p) for p in ids) / (time.time() - t0)


def torch_generate(model, ids, batch, new):
    with torch.no_grad():
        x, m = left_pad(ids[:batch], 0)
        model.generate(input_ids=x, attention_mask=m, max_new_tokens=2, do_sample=False,
                       pad_token_id=0)  # warm-up
        sync()
        t0 = time.time()
        for i in range(0, len(ids), batch):
            x, m = left_pad(ids[i:i + batch], 0)
            model.generate(input_ids=x, attention_mask=m, max_new_tokens=new, min_new_tokens=new,
                           do_sample=False, pad_token_id=0)
        sync()
        return time.time() - t0


def speed(rep, args, work, name, cfg, tok_dir, locate):
    d = os.path.join(work, name)
    t0 = time.time()
    model = synthetic(cfg, tok_dir, d)
    rep.note(f"{name}: synthetic bf16 checkpoint written in {time.time() - t0:.1f} s")
    do = os.path.join(args.assets, "do.txt")
    if args.limit:
        # A dry run on the CPU: fewer prompts (ours and theirs read the same ids either way).
        small = os.path.join(work, "do-small.txt")
        with open(do) as f, open(small, "w") as g:
            g.writelines(f.readlines()[:args.limit])
        do = small
    common = ["--model", d, "--prompts", do, "--device", OURS_DEV, "--dtype", "bf16"]
    ho = os.path.join(work, f"{name}-hidden.safetensors")
    run([args.bin, "hidden", *common, "--limit", "32", "--batch-size", "32", "--out", ho], 600)
    run([args.bin, "hidden", *common, "--batch-size", "32", "--out", ho], 600)
    _, meta = read_hidden(ho)
    tm = json.loads(meta["timings"])
    ours = tm["tokens"] / tm["seconds"]
    ids = json.loads(meta["input_ids"])
    theirs = torch_hidden_speed(model, ids, 32)
    ratio = ours / theirs
    rep.row("c", f"{name} hidden states, batch 32, {len(ids)} D_o prompts", f"{ours:.0f} tok/s",
            f"{theirs:.0f} tok/s", f"{ratio:.2f}x", "PASS" if ratio >= 1.5 else "MISS (>= 1.5x)")
    lo = os.path.join(work, f"{name}-gen.json")
    n_gen = min(256, len(ids))
    gen = [args.bin, "logits", *common, "--limit", str(n_gen), "--batch-size", "32", "--greedy",
           "32", "--out", lo]
    run(gen, 600)
    run(gen, 600)
    tm = json.load(open(lo))["timings"]
    ours = n_gen * 32 / tm["greedy_seconds"]
    theirs = n_gen * 32 / torch_generate(model, ids[:n_gen], 32, 32)
    ratio = ours / theirs
    rep.row("c", f"{name} generation, batch 32, {n_gen} prompts x 32 tokens", f"{ours:.0f} tok/s",
            f"{theirs:.0f} tok/s", f"{ratio:.2f}x", "PASS" if ratio >= 1.5 else "MISS (>= 1.5x)")
    if name.startswith("smollm2"):
        train_speed(rep, args, work, d, model)
    if locate:
        out = os.path.join(work, f"{name}-locate.jsonl")
        err, _ = run([args.bin, "generate", *common, "--scale", "12-16:1.2", "--max-new-tokens",
                      "16", "--ignore-eos", "--batch-size", "64", "--out", out], 600)
        found = re.search(r"generated \d+ tokens for \d+ prompts in ([\d.]+) s", err)
        if not found:
            raise RuntimeError(f"generate printed no timing: {err[-500:]}")
        secs = float(found.group(1))
        with torch.no_grad():
            for layer in model.model.layers[12:17]:
                for lin in [layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj,
                            layer.self_attn.o_proj, layer.mlp.gate_proj, layer.mlp.up_proj,
                            layer.mlp.down_proj]:
                    lin.weight.mul_(1.2)
        theirs = torch_generate(model, ids, 64, 16)
        rep.row("c", f"{name} one locate range (12-16 x 1.2): {len(ids)} D_o x 16 tokens, "
                f"batch 64", f"{secs:.1f} s", f"{theirs:.1f} s", f"{theirs / secs:.2f}x",
                "PASS" if secs <= 30 else "MISS (<= 30 s)")
    del model
    sync()


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bin", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--assets", default="gpu")
    ap.add_argument("--parts", default="a,b,c", help="which parts to run (a, b, c)")
    ap.add_argument("--device", default="cuda", help="cuda, or cpu for a dry run of this script")
    ap.add_argument("--models", default="smollm2,llama3-8b",
                    help="part c's models: smollm2 and/or llama3-8b")
    ap.add_argument("--limit", type=int, default=0, help="D_o prompts for part c (0: all 731)")
    args = ap.parse_args()
    global DEV, OURS_DEV, OURS_DEV_NAME
    if args.device == "cpu":
        DEV, OURS_DEV, OURS_DEV_NAME = "cpu", "cpu", "cpu"
    args.repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    os.makedirs(args.out, exist_ok=True)
    rep = Report(args.out)
    gpu = torch.cuda.get_device_name(0) if DEV == "cuda" else "none (dry run on the CPU)"
    rep.note(f"GPU: {gpu}; torch {torch.__version__}, transformers "
             f"{transformers.__version__}, CUDA {torch.version.cuda}")
    work = tempfile.mkdtemp(prefix="gpu-check-")
    parts = args.parts.split(",")
    if "a" in parts:
        parity(rep, args, work)
    if "b" in parts:
        training(rep, args, work)
    if "c" in parts:
        models = args.models.split(",")
        for name, cfg, tok, locate in [
            ("smollm2-shape", json.load(open(os.path.join(args.assets, "smollm2", "config.json"))),
             os.path.join(args.assets, "smollm2"), "llama3-8b" not in models),
            ("llama3-8b-shape", LLAMA3_8B, os.path.join(args.assets, "llama3"), True),
        ]:
            if name.split("-shape")[0] not in models:
                continue
            try:
                speed(rep, args, work, name, cfg, tok, locate)
            except Exception as e:
                rep.row("c", name, "error", "", str(e)[-400:].replace("|", "/").replace("\n", " "),
                        "FAIL")
    shutil.rmtree(work, ignore_errors=True)
    rep.note(f"total {time.time() - rep.t0:.0f} s")


if __name__ == "__main__":
    sys.exit(main())
