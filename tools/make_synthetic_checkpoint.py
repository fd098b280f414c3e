#!/usr/bin/env python3
"""Writes a checkpoint shaped exactly like Llama-3-8B-Instruct, with random weights, for
measuring memory and speed at 8B scale (never outputs: the weights mean nothing).

  python3 tools/make_synthetic_checkpoint.py --out DIR [--layers N] [--formats bf16,q8_0,q4_0]
                                             [--seed S] [--tokenizer DIR]

Writes, each only if not already complete (a killed run resumes where it stopped):
  DIR/bf16/                    config.json (Llama-3-8B-Instruct's, num_hidden_layers = N),
                               generation_config.json, tokenizer.json + tokenizer_config.json
                               (with the chat template) copied from --tokenizer, and bf16
                               safetensors model-0000K-of-0000M.safetensors +
                               model.safetensors.index.json (metadata.total_size, weight_map)
  DIR/synthetic-8b.Q8_0.gguf   (and one file per other GGUF type named in --formats) made by
                               make_gguf.py from DIR/bf16

Weights: normal with std 0.02, norms 1.0, each tensor from its own generator seeded by --seed
and the tensor's name, so a resumed run writes the same bytes. Shards are cut the way
transformers' save_pretrained cuts them (tensors in state-dict order, a new shard when the next
tensor would pass the limit): 5 GB at 32 layers, which gives the real checkpoint's 4 shards
of 4.98, 5.00, 4.92 and 1.17 GB; for a shorter model the limit shrinks with the total size, so
the shards keep those proportions (4 shards from 3 layers up, 3 for 1-2 layers). Memory stays under ~0.5 GB for the
bf16 files (a block of rows at a time) and ~1.5 GB for the GGUFs.

--layers N (default 32) keeps every width and the vocabulary and only drops layers: --layers 2
is a ~3 GB bf16 checkpoint for tests. The full 32-layer run needs 16.1 GB (bf16) + 8.5 GB
(Q8_0) + 4.5 GB (Q4_0) of disk and, at the ~45 M parameters/s per format measured on 2 cores
with --layers 2, about 9 minutes.
"""
import argparse
import json
import os
import shutil
import struct
import sys
import time
import zlib

import gguf
import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import make_gguf  # noqa: E402  (a sibling script, not a package)

# Llama-3-8B-Instruct's config.json, field for field; num_hidden_layers is set from --layers.
CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 128000,
    "eos_token_id": [128001, 128009],
    "hidden_act": "silu",
    "hidden_size": 4096,
    "initializer_range": 0.02,
    "intermediate_size": 14336,
    "max_position_embeddings": 8192,
    "model_type": "llama",
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 8,
    "pretraining_tp": 1,
    "rms_norm_eps": 1e-05,
    "rope_scaling": None,
    "rope_theta": 500000.0,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.40.0.dev0",
    "use_cache": True,
    "vocab_size": 128256,
}
GENERATION_CONFIG = {
    "bos_token_id": 128000,
    "do_sample": True,
    "eos_token_id": [128001, 128009],
    "max_length": 4096,
    "temperature": 0.6,
    "top_p": 0.9,
    "transformers_version": "4.40.0.dev0",
}
FULL_LAYERS = 32
SHARD_LIMIT = 5_000_000_000  # transformers' default max_shard_size ("5GB")
STD = 0.02
ROWS = 1024  # rows generated per step: 1024 x 14336 f32 = 58 MB
TOKENIZER_FILES = ["tokenizer.json", "tokenizer_config.json"]
DEFAULT_TOKENIZER = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                 "../../shared/tokenizers/llama3")


def tensors(cfg):
    """(name, shape) in LlamaForCausalLM's state-dict order."""
    h, f, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    kv = cfg["num_key_value_heads"] * h // cfg["num_attention_heads"]
    out = [("model.embed_tokens.weight", (v, h))]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        out += [
            (p + "self_attn.q_proj.weight", (h, h)),
            (p + "self_attn.k_proj.weight", (kv, h)),
            (p + "self_attn.v_proj.weight", (kv, h)),
            (p + "self_attn.o_proj.weight", (h, h)),
            (p + "mlp.gate_proj.weight", (f, h)),
            (p + "mlp.up_proj.weight", (f, h)),
            (p + "mlp.down_proj.weight", (h, f)),
            (p + "input_layernorm.weight", (h,)),
            (p + "post_attention_layernorm.weight", (h,)),
        ]
    return out + [("model.norm.weight", (h,)), ("lm_head.weight", (v, h))]


def nbytes(shape):
    return int(np.prod(shape)) * 2


def shard_plan(cfg):
    total = sum(nbytes(s) for _, s in tensors(cfg))
    full = sum(nbytes(s) for _, s in tensors(dict(cfg, num_hidden_layers=FULL_LAYERS)))
    limit = SHARD_LIMIT * total // full
    shards, size = [[]], 0
    for name, shape in tensors(cfg):
        if shards[-1] and size + nbytes(shape) > limit:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nbytes(shape)
    n = len(shards)
    return [(f"model-{k + 1:05d}-of-{n:05d}.safetensors", s) for k, s in enumerate(shards)]


def header(entries):
    """A safetensors header: JSON with byte ranges, padded with spaces to 8 bytes."""
    meta, off = {"__metadata__": {"format": "pt"}}, 0
    for name, shape in entries:
        meta[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [off, off + nbytes(shape)]}
        off += nbytes(shape)
    js = json.dumps(meta, separators=(",", ":")).encode()
    js += b" " * (-len(js) % 8)
    return struct.pack("<Q", len(js)) + js


def write_tensor(fh, name, shape, seed):
    if len(shape) == 1:
        fh.write(torch.ones(shape, dtype=torch.bfloat16).view(torch.int16).numpy().tobytes())
        return
    g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    for a in range(0, shape[0], ROWS):
        rows = min(ROWS, shape[0] - a)
        x = (torch.randn(rows, shape[1], generator=g) * STD).to(torch.bfloat16)
        fh.write(x.view(torch.int16).numpy().tobytes())


def write_atomic_text(path, text):
    tmp = make_gguf.tmp_name(path)
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def check_space(path, need):
    free = shutil.disk_usage(path).free
    if free < need:
        sys.exit(f"make_synthetic_checkpoint: {path} has {free / 1e9:.1f} GB free, "
                 f"{need / 1e9:.1f} GB more needed")


def make_bf16(d, cfg, seed, tokenizer):
    os.makedirs(d, exist_ok=True)
    cfg_path = os.path.join(d, "config.json")
    if os.path.exists(cfg_path):
        old = make_gguf.read_json(cfg_path)
        if old != cfg:
            sys.exit(f"make_synthetic_checkpoint: {cfg_path} differs from the requested config "
                     f"(num_hidden_layers {old.get('num_hidden_layers')} there, "
                     f"{cfg['num_hidden_layers']} asked); use another --out")
    for f in TOKENIZER_FILES:
        src = os.path.join(tokenizer, f)
        if not os.path.exists(src):
            sys.exit(f"make_synthetic_checkpoint: {src} missing (--tokenizer names the directory)")
        tmp = make_gguf.tmp_name(os.path.join(d, f))
        shutil.copyfile(src, tmp)
        os.replace(tmp, os.path.join(d, f))
    write_atomic_text(os.path.join(d, "generation_config.json"), json.dumps(GENERATION_CONFIG, indent=2) + "\n")
    plan = shard_plan(cfg)
    todo = []
    for fname, entries in plan:
        path = os.path.join(d, fname)
        size = len(header(entries)) + sum(nbytes(s) for _, s in entries)
        if not (os.path.exists(path) and os.path.getsize(path) == size):
            todo.append((path, entries, size))
    check_space(d, sum(s for _, _, s in todo))
    for path, entries, size in todo:
        t0 = time.time()
        tmp = make_gguf.tmp_name(path)
        try:
            with open(tmp, "wb") as fh:
                fh.write(header(entries))
                for name, shape in entries:
                    write_tensor(fh, name, shape, seed)
            if os.path.getsize(tmp) != size:
                raise RuntimeError(f"{tmp}: {os.path.getsize(tmp)} bytes written, {size} expected")
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise
        print(f"  {os.path.basename(path)}: {size / 1e9:.2f} GB in {time.time() - t0:.1f} s")
    index = {
        "metadata": {"total_size": sum(nbytes(s) for _, s in tensors(cfg))},
        "weight_map": {n: fname for fname, entries in plan for n, _ in entries},
    }
    write_atomic_text(os.path.join(d, "model.safetensors.index.json"), json.dumps(index, indent=2) + "\n")
    # Written last: its presence with the right content marks the directory complete.
    write_atomic_text(cfg_path, json.dumps(cfg, indent=2) + "\n")
    return len(todo), len(plan), sum(s - len(header(e)) for _, e, s in todo) // 2


def bf16_complete(d, cfg):
    if not os.path.exists(os.path.join(d, "config.json")):
        return False
    for fname, entries in shard_plan(cfg):
        path = os.path.join(d, fname)
        size = len(header(entries)) + sum(nbytes(s) for _, s in entries)
        if not (os.path.exists(path) and os.path.getsize(path) == size):
            return False
    return make_gguf.read_json(os.path.join(d, "config.json")) == cfg


SCALAR_BYTES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}


def gguf_layout(path):
    """(tensor count, byte where the last tensor's data ends, alignment) from a GGUF header.
    Walked by hand: gguf.GGUFReader parses all 128k token strings and takes ~20 s."""
    with open(path, "rb") as f:
        def u(n):
            b = f.read(n)
            if len(b) != n:
                raise ValueError("cut short")
            return int.from_bytes(b, "little")

        def skip(vtype):
            if vtype == 8:
                f.seek(u(8), 1)
            elif vtype == 9:
                sub, n = u(4), u(8)
                if sub in SCALAR_BYTES:
                    f.seek(SCALAR_BYTES[sub] * n, 1)
                else:
                    for _ in range(n):
                        skip(sub)
            else:
                f.seek(SCALAR_BYTES[vtype], 1)

        if f.read(4) != b"GGUF" or u(4) != 3:
            raise ValueError("not a GGUF v3 file")
        n_tensors, n_kv, align = u(8), u(8), 32
        for _ in range(n_kv):
            key = f.read(u(8))
            vtype = u(4)
            if key == b"general.alignment" and vtype == 4:
                align = u(4)
            else:
                skip(vtype)
        end = 0
        for _ in range(n_tensors):
            f.seek(u(8), 1)
            dims = [u(8) for _ in range(u(4))]
            block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(u(4))]
            end = max(end, u(8) + int(np.prod(dims)) // block * size)
        start = f.tell()
    return n_tensors, start + (-start % align) + end, align


def gguf_complete(path, cfg):
    """The file ends where its last tensor's data (plus alignment padding) ends, and holds
    the tensors of this config: a half-written or differently-shaped file is redone."""
    if not os.path.exists(path):
        return False
    try:
        n, end, align = gguf_layout(path)
    except (ValueError, KeyError, OSError):
        return False
    return n == 9 * cfg["num_hidden_layers"] + 3 and 0 <= os.path.getsize(path) - end < align


def disk_size(path):
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="output directory (created)")
    ap.add_argument("--layers", type=int, default=FULL_LAYERS, help="decoder layers (default 32)")
    ap.add_argument("--formats", default="bf16,q8_0,q4_0",
                    help="bf16 (the safetensors dir) and GGUF types of make_gguf.py, comma-separated")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tokenizer", default=DEFAULT_TOKENIZER,
                    help="directory with Llama-3's tokenizer.json and tokenizer_config.json")
    a = ap.parse_args()
    if not 1 <= a.layers <= FULL_LAYERS:
        sys.exit(f"make_synthetic_checkpoint: --layers {a.layers}: between 1 and {FULL_LAYERS}")
    formats = [f.strip().lower() for f in a.formats.split(",") if f.strip()]
    bad = [f for f in formats if f != "bf16" and f not in make_gguf.TYPES]
    if bad or not formats:
        sys.exit(f"make_synthetic_checkpoint: --formats {a.formats!r}: choose from bf16, "
                 f"{', '.join(t for t in make_gguf.TYPES if t != 'bf16')}")
    cfg = dict(CONFIG, num_hidden_layers=a.layers)
    make_gguf.exit_on_sigterm()
    os.makedirs(a.out, exist_ok=True)
    hf = os.path.join(a.out, "bf16")
    n_params = sum(int(np.prod(s)) for _, s in tensors(cfg))
    print(f"{a.layers} layers, {n_params / 1e9:.3f} B parameters, seed {a.seed}")
    start = time.time()
    for fmt in formats:
        t0 = time.time()
        if fmt == "bf16":
            if bf16_complete(hf, cfg):
                print(f"bf16: {hf} complete, skipped ({disk_size(hf) / 1e9:.2f} GB)")
                continue
            made, total, done = make_bf16(hf, cfg, a.seed, a.tokenizer)
            where, what = hf, f"{total} shards ({made} written now)"
        else:
            where = os.path.join(a.out, f"synthetic-8b.{fmt.upper()}.gguf")
            if gguf_complete(where, cfg):
                print(f"{fmt}: {where} complete, skipped ({disk_size(where) / 1e9:.2f} GB)")
                continue
            if not bf16_complete(hf, cfg):
                sys.exit(f"make_synthetic_checkpoint: {fmt} is made from {hf}, which is not "
                         "complete: include bf16 in --formats")
            bpw = {"q8_0": 1.07, "q4_0": 0.57, "q4_1": 0.63, "q5_0": 0.69, "q5_1": 0.75,
                   "f16": 2.0, "f32": 4.0}[fmt]
            check_space(a.out, int(n_params * bpw) + (1 << 28))
            try:
                make_gguf.make_gguf(hf, where, fmt, name=f"synthetic-8b-{a.layers}L")
            except make_gguf.BadInput as e:
                sys.exit(f"make_synthetic_checkpoint: {e}")
            what, done = "GGUF", n_params
        dt = time.time() - t0
        print(f"{fmt}: {where}: {what}, {disk_size(where) / 1e9:.2f} GB on disk, {dt:.1f} s "
              f"({done / dt / 1e6:.0f} M parameters/s written)")
    print(f"done in {time.time() - start:.1f} s")


if __name__ == "__main__":
    main()
