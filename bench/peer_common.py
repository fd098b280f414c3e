"""The peer's side shared by the peer scripts: loading with transformers, the same prompts as
ours, left-padded batches and batched greedy generation with `model.generate`."""
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402


def load(model_dir, threads=0, dtype="f32"):
    if threads:
        torch.set_num_threads(threads)
    tok = AutoTokenizer.from_pretrained(model_dir)
    dt = {"f32": torch.float32, "bf16": torch.bfloat16}[dtype]
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dt).eval()
    return tok, model


def encode(tok, records):
    """Token ids of the Alpaca-formatted records, with the tokenizer's defaults (as ours)."""
    return [tok(common.alpaca(r["instruction"], r.get("input")))["input_ids"] for r in records]


def pad_id(tok):
    return tok.pad_token_id if tok.pad_token_id is not None else 0


def left_pad(rows, pad):
    """Ids, attention mask and positions counted from each row's first real token."""
    t = max(len(r) for r in rows)
    ids = torch.full((len(rows), t), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), t), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, t - len(r):] = torch.tensor(r)
        mask[i, t - len(r):] = 1
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids, mask, pos


def longest_first(ids):
    return sorted(range(len(ids)), key=lambda i: -len(ids[i]))


def generate(model, ids, batch_size, max_new_tokens, eos, pad):
    """Greedy new tokens of every prompt (cut after the first EOS, which is kept, as ours keeps
    it), in batches of prompts sorted longest first; returns (outputs, seconds)."""
    out = [None] * len(ids)
    order = longest_first(ids)
    t0 = time.perf_counter()
    with torch.inference_mode():
        for s in range(0, len(order), batch_size):
            chunk = order[s:s + batch_size]
            x, mask, _ = left_pad([ids[i] for i in chunk], pad)
            g = model.generate(input_ids=x, attention_mask=mask, do_sample=False, num_beams=1,
                               max_new_tokens=max_new_tokens, eos_token_id=eos, pad_token_id=pad)
            for j, i in enumerate(chunk):
                new = g[j, x.shape[1]:].tolist()
                for k, t in enumerate(new):
                    if t in eos:
                        new = new[:k + 1]
                        break
                out[i] = new
    return out, time.perf_counter() - t0


def eos_ids(model):
    e = model.generation_config.eos_token_id
    if e is None:
        e = model.config.eos_token_id
    return [e] if isinstance(e, int) else list(e)


def warm_up(model, ids, pad):
    """One short untimed generation: the first call pays one-off set-up."""
    x, mask, _ = left_pad(ids[:2], pad)
    with torch.inference_mode():
        model.generate(input_ids=x, attention_mask=mask, do_sample=False, max_new_tokens=2, pad_token_id=pad)
