#!/usr/bin/env python3
"""SPPFT with the Hugging Face Trainer and DeepSpeed ZeRO-2, written by `safety-layers export`.

Fine-tunes with the safety layers' attention/MLP weights frozen (requires_grad False), as SPPFT
does (Li et al., ICLR 2025, section 4), with the paper's hyper-parameters (the constants below).
ZeRO-2 shards gradients and optimizer state across GPUs; frozen tensors get neither. Launch:

    deepspeed --num_gpus N train_sppft.py          (or: torchrun --nproc_per_node N train_sppft.py)

Options: --no-deepspeed (plain Trainer, one process), --lora ADAPTER_DIR (LoRA-SPPFT: PEFT adapters
from `safety-layers export --format peft` instead of a frozen full fine-tune), --output-dir DIR,
--max-steps N (a short smoke run). Needs torch, transformers, deepspeed (and peft for --lora).
Importing this file only defines the plan and the helpers below.
"""
import argparse
import json
import os
import re

# @@PLAN@@

# The effective batch is MICRO_BATCH_SIZE x GRAD_ACCUM x number of GPUs: the paper's 4 x 32 = 128
# was one process; divide GRAD_ACCUM by the GPU count to keep it.

_LAYER_MODULE = re.compile(r"^model\.layers\.(\d+)\.([^.]+)\.")


def is_frozen(name):
    """SPPFT's rule on a Hugging Face parameter name: a frozen submodule of a layer in the range."""
    m = _LAYER_MODULE.match(name)
    return m is not None and FREEZE_FIRST <= int(m.group(1)) <= FREEZE_LAST and m.group(2) in FREEZE_MODULES


def apply_freeze(model):
    """Sets requires_grad False on exactly the planned tensors and returns their names. A model
    whose names differ from the plan (another wrapper, another architecture) is refused rather
    than trained unfrozen."""
    frozen = []
    for name, param in model.named_parameters():
        if is_frozen(name):
            param.requires_grad_(False)
            frozen.append(name)
    if sorted(frozen) != sorted(FROZEN_PARAMETERS):
        missing = sorted(set(FROZEN_PARAMETERS) - set(frozen))
        extra = sorted(set(frozen) - set(FROZEN_PARAMETERS))
        raise SystemExit(f"the model's parameters do not match the freeze plan: missing {missing[:4]}, unexpected {extra[:4]}")
    return frozen


def alpaca_prompt(rec):
    """The paper's prompt: the Alpaca template, with the Input variant when the record has one."""
    if rec.get("input"):
        return ALPACA_INPUT.replace("{instruction}", rec["instruction"], 1).replace("{input}", rec["input"], 1)
    return ALPACA.replace("{instruction}", rec["instruction"])


def read_records(path):
    """{instruction, input, output} records from a JSON array or JSONL file."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if text.lstrip().startswith("["):
        records = json.loads(text)
    else:
        records = [json.loads(line) for line in text.splitlines() if line.strip()]
    for i, rec in enumerate(records):
        for field in ("instruction", "output"):
            if not isinstance(rec.get(field), str):
                raise SystemExit(f"{path}: record {i} has no string field `{field}`")
    if not records:
        raise SystemExit(f"{path}: no training records")
    return records


def encode(tok, rec):
    """prompt + output with the tokenizer's special tokens, cut at MAX_LEN, then the tokenizer's
    own EOS if there is room (the paper's code appended Llama-3's <|eot_id|> to every model)."""
    prompt = alpaca_prompt(rec)
    ids = list(tok(prompt + rec["output"])["input_ids"][:MAX_LEN])
    if ids and ids[-1] != tok.eos_token_id and len(ids) < MAX_LEN:
        ids.append(tok.eos_token_id)
    labels = list(ids)
    if not TRAIN_ON_INPUTS:
        n = min(len(tok(prompt)["input_ids"]), len(ids))
        labels[:n] = [-100] * n
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}


def main(argv=None):
    ap = argparse.ArgumentParser(description="SPPFT with the Hugging Face Trainer + DeepSpeed ZeRO-2")
    ap.add_argument("--output-dir", default=OUTPUT_DIR)
    ap.add_argument("--no-deepspeed", action="store_true", help="plain Trainer, no DeepSpeed")
    ap.add_argument("--lora", metavar="ADAPTER_DIR", help="LoRA-SPPFT with this adapter_config.json's directory")
    ap.add_argument("--max-steps", type=int, default=-1, help="stop after N optimizer steps")
    ap.add_argument("--local_rank", "--local-rank", type=int, default=-1, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq, Trainer, TrainingArguments

    here = os.path.dirname(os.path.abspath(__file__))
    tok = AutoTokenizer.from_pretrained(BASE_MODEL)
    if tok.eos_token_id is None:
        raise SystemExit(f"{BASE_MODEL}: the tokenizer has no EOS token to end training examples with")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token  # padding is masked out of attention and loss
    records = read_records(DATA)
    train, held = (records[:-HOLDOUT], records[-HOLDOUT:]) if HOLDOUT else (records, [])
    if not train:
        raise SystemExit(f"{DATA}: {len(records)} records, all of them held out (HOLDOUT = {HOLDOUT})")
    train_ds = [encode(tok, r) for r in train]
    held_ds = [encode(tok, r) for r in held]

    # Master weights in fp32 whatever the checkpoint stores (bf16 means mixed precision on top).
    version = tuple(int(x) for x in re.findall(r"\d+", transformers.__version__)[:2])
    dtype_kw = "dtype" if version >= (4, 56) else "torch_dtype"
    model = AutoModelForCausalLM.from_pretrained(BASE_MODEL, **{dtype_kw: torch.float32})
    if args.lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig.from_pretrained(args.lora))
        model.print_trainable_parameters()
        frozen = None
    else:
        frozen = apply_freeze(model)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        print(f"SPPFT: {len(frozen)} tensors of layers {FREEZE_FIRST}-{FREEZE_LAST} frozen; {trainable} parameters train")

    targs = TrainingArguments(
        output_dir=args.output_dir,
        num_train_epochs=EPOCHS,
        max_steps=args.max_steps,
        learning_rate=LR,
        lr_scheduler_type=LR_SCHEDULER,
        warmup_steps=WARMUP_STEPS,
        per_device_train_batch_size=MICRO_BATCH_SIZE,
        per_device_eval_batch_size=MICRO_BATCH_SIZE,
        gradient_accumulation_steps=GRAD_ACCUM,
        optim="adamw_torch",
        adam_beta1=ADAM_BETA1,
        adam_beta2=ADAM_BETA2,
        adam_epsilon=ADAM_EPSILON,
        weight_decay=WEIGHT_DECAY,
        max_grad_norm=MAX_GRAD_NORM,
        bf16=PRECISION == "bf16",
        gradient_checkpointing=GRAD_CHECKPOINTING,
        gradient_checkpointing_kwargs={"use_reentrant": False} if GRAD_CHECKPOINTING else None,
        seed=SEED,
        data_seed=SEED,
        logging_steps=1,
        save_strategy="epoch",
        eval_strategy="epoch" if held_ds else "no",
        report_to="none",
        remove_unused_columns=False,
        deepspeed=None if args.no_deepspeed else os.path.join(here, "ds_zero2.json"),
    )
    trainer = Trainer(
        model=model,
        args=targs,
        train_dataset=train_ds,
        eval_dataset=held_ds or None,
        data_collator=DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100),
        processing_class=tok,
    )
    trainer.train()
    trainer.save_model(args.output_dir)
    if trainer.is_world_process_zero():
        tok.save_pretrained(args.output_dir)
        with open(os.path.join(args.output_dir, "sppft_plan.json"), "w", encoding="utf-8") as f:
            json.dump({"base_model": BASE_MODEL, "data": DATA, "freeze_first": FREEZE_FIRST, "freeze_last": FREEZE_LAST,
                       "freeze_modules": list(FREEZE_MODULES), "frozen_parameters": frozen, "lora": args.lora}, f, indent=2)


if __name__ == "__main__":
    main()
