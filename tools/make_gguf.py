#!/usr/bin/env python3
"""Writes a llama.cpp-compatible GGUF file from a Hugging Face Llama-family checkpoint.

  python3 tools/make_gguf.py --hf DIR --out FILE.gguf --type q8_0|q4_0|q4_1|q5_0|q5_1|f16|bf16|f32
                             [--pre NAME] [--name NAME]

DIR holds config.json (model_type llama: Llama-2/3, SmolLM2, ...), model.safetensors or
model.safetensors.index.json with its shards, tokenizer.json (byte-level BPE) and
tokenizer_config.json (chat template there or in chat_template.jinja).

What llama.cpp's own converter does for `llama` and this script does too: tensor names
token_embd / blk.N.{attn_q,attn_k,attn_v,attn_output,ffn_gate,ffn_up,ffn_down,attn_norm,
ffn_norm} / output_norm / output; the rows of attn_q and attn_k permuted per head into the
interleaved rope layout llama.cpp computes with; 1-D tensors (norms) kept F32; a 2-D tensor
whose row length is not a multiple of the quantization block falls back to F16 (listed in the
summary). The tensors are streamed one at a time, a block of rows at a time, read from the
safetensors files (plain reads, no mmap), so an 8B checkpoint needs about the largest quantized tensor plus a little in RAM
(about 1 GB for Llama-3-8B's embedding as bf16). The file is written to a temporary sibling
and renamed when complete.

`--pre` sets tokenizer.ggml.pre (llama.cpp's name for the pre-tokenizer split rule); without it
the rule is recognised from tokenizer.json: Llama-3's regex -> llama-bpe, digits split one by
one then byte-level -> smollm, plain byte-level -> gpt2; anything else asks for --pre.
"""
import argparse
import json
import os
import signal
import sys
import time

import numpy as np

try:
    import gguf
except ImportError as e:
    sys.exit(f"make_gguf: missing Python package ({e}); needs gguf")

Q = gguf.GGMLQuantizationType
TYPES = {
    "f32": (Q.F32, gguf.LlamaFileType.ALL_F32),
    "f16": (Q.F16, gguf.LlamaFileType.MOSTLY_F16),
    "bf16": (Q.BF16, gguf.LlamaFileType.MOSTLY_BF16),
    "q8_0": (Q.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
    "q4_0": (Q.Q4_0, gguf.LlamaFileType.MOSTLY_Q4_0),
    "q4_1": (Q.Q4_1, gguf.LlamaFileType.MOSTLY_Q4_1),
    "q5_0": (Q.Q5_0, gguf.LlamaFileType.MOSTLY_Q5_0),
    "q5_1": (Q.Q5_1, gguf.LlamaFileType.MOSTLY_Q5_1),
}

LAYER_NAMES = [
    ("self_attn.q_proj.weight", "attn_q.weight"),
    ("self_attn.k_proj.weight", "attn_k.weight"),
    ("self_attn.v_proj.weight", "attn_v.weight"),
    ("self_attn.o_proj.weight", "attn_output.weight"),
    ("mlp.gate_proj.weight", "ffn_gate.weight"),
    ("mlp.up_proj.weight", "ffn_up.weight"),
    ("mlp.down_proj.weight", "ffn_down.weight"),
    ("input_layernorm.weight", "attn_norm.weight"),
    ("post_attention_layernorm.weight", "ffn_norm.weight"),
]

LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Rows quantized per step: bounds the f32 working copy (4096 rows x 4096 columns = 64 MB).
ROW_CHUNK = 4096


class BadInput(Exception):
    pass


def read_json(path):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise BadInput(f"{path}: file not found")
    except json.JSONDecodeError as e:
        raise BadInput(f"{path}: not valid JSON ({e})")


def need(cfg, key, path):
    if key not in cfg:
        raise BadInput(f"{path}: field `{key}` missing")
    return cfg[key]


DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16}


class Weights:
    """The checkpoint's safetensors, one file or sharded. Rows are read with plain reads, not
    mmap: mapped pages count as the process's resident memory, so an mmap reader of an 8B
    checkpoint would show 16 GB of RSS while needing a few hundred MB."""

    def __init__(self, hf_dir):
        index = os.path.join(hf_dir, "model.safetensors.index.json")
        single = os.path.join(hf_dir, "model.safetensors")
        if os.path.exists(index):
            files = sorted(set(need(read_json(index), "weight_map", index).values()))
            paths = [os.path.join(hf_dir, f) for f in files]
        elif os.path.exists(single):
            paths = [single]
        else:
            raise BadInput(f"{hf_dir}: neither model.safetensors nor model.safetensors.index.json")
        self.info = {}  # name -> (path, dtype, shape, first byte)
        for path in paths:
            for name, (dtype, shape, start) in read_header(path).items():
                if name in self.info:
                    raise BadInput(f"{path}: tensor {name} also in {self.info[name][0]}")
                self.info[name] = (path, dtype, shape, start)

    def names(self):
        return set(self.info)

    def shape(self, name):
        return self.info[name][2]

    def rows(self, name, a, b):
        """Rows a..b of a tensor as float32 numpy (the only copy made of them)."""
        path, dtype, shape, start = self.info[name]
        row = int(np.prod(shape[1:], dtype=np.int64))
        count = (b - a) * row
        with open(path, "rb") as f:
            f.seek(start + a * row * np.dtype(dtype).itemsize)
            x = np.fromfile(f, dtype=dtype, count=count)
        if x.size != count:
            raise BadInput(f"{path}: tensor {name} is cut short")
        if dtype == np.uint16:  # bf16: the high half of an f32
            x = (x.astype(np.uint32) << 16).view(np.float32)
        return x.astype(np.float32, copy=False).reshape((b - a, *shape[1:]))

    def full(self, name):
        return self.rows(name, 0, self.shape(name)[0])


def read_header(path):
    """{name: (numpy dtype, shape, absolute first byte)} of a safetensors file, checked."""
    if not os.path.exists(path):
        raise BadInput(f"{path}: shard named in the index is missing")
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if not 0 < n <= size - 8:
            raise BadInput(f"{path}: not a safetensors file (header length {n})")
        try:
            meta = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise BadInput(f"{path}: safetensors header is not JSON ({e})")
    out = {}
    for name, t in meta.items():
        if name == "__metadata__":
            continue
        if t.get("dtype") not in DTYPES:
            raise BadInput(f"{path}: tensor {name} has dtype {t.get('dtype')}; F32, F16, BF16 read")
        dtype, shape = DTYPES[t["dtype"]], tuple(t["shape"])
        a, b = t["data_offsets"]
        if b - a != int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize or 8 + n + b > size:
            raise BadInput(f"{path}: tensor {name}'s byte range [{a}, {b}) does not fit")
        out[name] = (dtype, shape, 8 + n + a)
    return out


def rope_permute(w, n_head):
    """llama.cpp computes rope on adjacent pairs (x0,x1),(x2,x3)...; Hugging Face's Llama pairs
    x_i with x_{i+d/2}. Interleaving each head's two halves row-wise makes the two agree."""
    rows = w.shape[0]
    if rows % (2 * n_head):
        raise BadInput(f"{rows} rows do not split into {n_head} heads of two rope halves")
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def tensor_plan(cfg, cfg_path, weights):
    """(gguf name, hf name, heads to permute by or None) in llama.cpp's order."""
    n_layer = need(cfg, "num_hidden_layers", cfg_path)
    n_head = need(cfg, "num_attention_heads", cfg_path)
    n_kv = cfg.get("num_key_value_heads", n_head)
    plan = [("token_embd.weight", "model.embed_tokens.weight", None)]
    for i in range(n_layer):
        for hf, gg in LAYER_NAMES:
            perm = n_head if gg == "attn_q.weight" else n_kv if gg == "attn_k.weight" else None
            plan.append((f"blk.{i}.{gg}", f"model.layers.{i}.{hf}", perm))
    plan.append(("output_norm.weight", "model.norm.weight", None))
    have = weights.names()
    if "lm_head.weight" in have:
        plan.append(("output.weight", "lm_head.weight", None))
    elif not cfg.get("tie_word_embeddings", False):
        raise BadInput("lm_head.weight missing and config.json's tie_word_embeddings is not true")
    missing = [hf for _, hf, _ in plan if hf not in have]
    if missing:
        raise BadInput(f"tensors missing from the safetensors: {', '.join(missing[:5])}")
    used = {hf for _, hf, _ in plan}
    extra = sorted(n for n in have - used if not n.endswith("rotary_emb.inv_freq"))
    if extra:
        raise BadInput(f"tensors this Llama layout does not have: {', '.join(extra[:5])}")
    return plan


def token_text(tok):
    return tok["content"] if isinstance(tok, dict) else tok


def vocabulary(hf_dir, cfg, pre):
    """tokens, token types, merges and the tokenizer keys, from tokenizer.json + config."""
    tj_path = os.path.join(hf_dir, "tokenizer.json")
    tc_path = os.path.join(hf_dir, "tokenizer_config.json")
    tj = read_json(tj_path)
    tc = read_json(tc_path) if os.path.exists(tc_path) else {}
    model = need(tj, "model", tj_path)
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        raise BadInput(
            f"{tj_path}: model is {model.get('type')} (byte_fallback {model.get('byte_fallback')});"
            " only byte-level BPE vocabularies (tokenizer.ggml.model gpt2) are written"
        )
    n_vocab = need(cfg, "vocab_size", os.path.join(hf_dir, "config.json"))
    by_id = {i: t for t, i in need(model, "vocab", tj_path).items()}
    special = {}
    for a in tj.get("added_tokens", []):
        by_id[a["id"]] = a["content"]
        special[a["id"]] = bool(a.get("special"))
    if by_id and max(by_id) >= n_vocab:
        raise BadInput(f"{tj_path}: token id {max(by_id)} >= config vocab_size {n_vocab}")
    tokens, types = [], []
    for i in range(n_vocab):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")  # llama.cpp's filler for ids the tokenizer leaves unused
            types.append(gguf.TokenType.UNUSED)
        else:
            tokens.append(by_id[i])
            types.append(
                gguf.TokenType.NORMAL if i not in special
                else gguf.TokenType.CONTROL if special[i] else gguf.TokenType.USER_DEFINED
            )
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    text_id = {t: i for i, t in by_id.items()}

    def tid(key):
        t = tc.get(key)
        if t is None:
            return None
        t = token_text(t)
        if t not in text_id:
            raise BadInput(f"{tc_path}: {key} {t!r} is not in the vocabulary")
        return text_id[t]

    ids = {}
    for key in ["bos", "eos", "pad", "unk"]:
        i = tid(f"{key}_token")
        if i is None:
            v = cfg.get(f"{key}_token_id")
            i = v[0] if isinstance(v, list) and v else v
        if i is not None:
            ids[key] = int(i)
    # Llama-3-Instruct lists two stop ids in config.json; the one that is not eos is the turn end.
    cfg_eos = cfg.get("eos_token_id")
    if isinstance(cfg_eos, list):
        rest = [int(i) for i in cfg_eos if int(i) != ids.get("eos")]
        if rest:
            ids["eot"] = rest[0]
    add_bos = tc.get("add_bos_token")
    if add_bos is None:
        add_bos = post_processor_adds_bos(tj.get("post_processor"), by_id.get(ids.get("bos")))
    template = tc.get("chat_template")
    jinja = os.path.join(hf_dir, "chat_template.jinja")
    if template is None and os.path.exists(jinja):
        with open(jinja, encoding="utf-8") as f:
            template = f.read()
    return {
        "tokens": tokens, "types": types, "merges": merges, "ids": ids,
        "add_bos": bool(add_bos), "add_eos": tc.get("add_eos_token"),
        "template": template, "pre": pre or detect_pre(tj.get("pre_tokenizer"), tj_path),
    }


def post_processor_adds_bos(pp, bos_text):
    if not pp or bos_text is None:
        return False
    if pp.get("type") == "Sequence":
        return any(post_processor_adds_bos(p, bos_text) for p in pp.get("processors", []))
    if pp.get("type") == "TemplateProcessing":
        single = pp.get("single") or []
        return bool(single) and single[0].get("SpecialToken", {}).get("id") == bos_text
    return False


def detect_pre(pt, path):
    if pt is None:
        raise BadInput(f"{path}: no pre_tokenizer; name llama.cpp's rule with --pre")
    parts = pt.get("pretokenizers", [pt]) if pt.get("type") == "Sequence" else [pt]
    kinds = [p.get("type") for p in parts]
    if kinds == ["ByteLevel"] and parts[0].get("use_regex", True):
        return "gpt2"
    if kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits"):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and parts[0].get("pattern", {}).get("Regex") == LLAMA3_REGEX:
        return "llama-bpe"
    raise BadInput(f"{path}: pre_tokenizer {kinds} not recognised; name llama.cpp's rule with --pre")


def add_metadata(w, cfg, cfg_path, vocab, file_type, name):
    hidden = need(cfg, "hidden_size", cfg_path)
    n_head = need(cfg, "num_attention_heads", cfg_path)
    w.add_type("model")
    w.add_name(name)
    w.add_context_length(need(cfg, "max_position_embeddings", cfg_path))
    w.add_embedding_length(hidden)
    w.add_block_count(need(cfg, "num_hidden_layers", cfg_path))
    w.add_feed_forward_length(need(cfg, "intermediate_size", cfg_path))
    w.add_head_count(n_head)
    w.add_head_count_kv(cfg.get("num_key_value_heads", n_head))
    w.add_rope_freq_base(float(cfg.get("rope_theta", 10000.0)))
    w.add_layer_norm_rms_eps(float(need(cfg, "rms_norm_eps", cfg_path)))
    w.add_rope_dimension_count(cfg.get("head_dim") or hidden // n_head)
    w.add_vocab_size(need(cfg, "vocab_size", cfg_path))
    rs = cfg.get("rope_scaling")
    if rs:
        kind = rs.get("rope_type", rs.get("type"))
        if kind != "linear":
            raise BadInput(f"{cfg_path}: rope_scaling type {kind!r} is not written by this script")
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(rs["factor"]))
    w.add_file_type(file_type)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(vocab["pre"])
    w.add_token_list(vocab["tokens"])
    w.add_token_types(vocab["types"])
    w.add_token_merges(vocab["merges"])
    ids = vocab["ids"]
    setters = {"bos": w.add_bos_token_id, "eos": w.add_eos_token_id,
               "pad": w.add_pad_token_id, "unk": w.add_unk_token_id, "eot": w.add_eot_token_id}
    for key, setter in setters.items():
        if key in ids:
            setter(ids[key])
    w.add_add_bos_token(vocab["add_bos"])
    if vocab["add_eos"] is not None:
        w.add_add_eos_token(bool(vocab["add_eos"]))
    if vocab["template"]:
        w.add_chat_template(vocab["template"])


def target_type(shape, qtype):
    """The GGML type a tensor is stored as, and why it is not qtype when it is not."""
    if len(shape) == 1:
        return Q.F32, None
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    if shape[-1] % block:
        return Q.F16, f"row length {shape[-1]} not a multiple of {qtype.name}'s block {block}"
    return qtype, None


def encode(weights, hf, shape, perm, gtype):
    """The tensor's bytes in gtype, converted a block of rows at a time."""
    if len(shape) == 1:
        return weights.full(hf).astype(np.float32)
    if gtype == Q.F32:
        out = np.empty(shape, dtype=np.float32)
    elif gtype == Q.F16:
        out = np.empty(shape, dtype=np.float16)
    else:
        out = np.empty(gguf.quant_shape_to_byte_shape(shape, gtype), dtype=np.uint8)
    if perm is not None:
        # q/k are at most hidden x hidden: permuted whole (the permutation spans a head's rows).
        out[:] = gguf.quantize(rope_permute(weights.full(hf), perm), gtype)
        return out
    for a in range(0, shape[0], ROW_CHUNK):
        b = min(a + ROW_CHUNK, shape[0])
        out[a:b] = gguf.quantize(weights.rows(hf, a, b), gtype)
    return out


def tmp_name(path):
    """A temporary sibling of path; those a killed run left behind (their process gone) are
    removed first."""
    d, base = os.path.dirname(os.path.abspath(path)), os.path.basename(path)
    prefix = f".{base}.tmp-"
    for f in os.listdir(d):
        pid = f[len(prefix):]
        if f.startswith(prefix) and pid.isdigit() and not pid_alive(int(pid)):
            os.remove(os.path.join(d, f))
    return os.path.join(d, prefix + str(os.getpid()))


def pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def exit_on_sigterm():
    """SIGTERM as SystemExit, so the `except BaseException` cleanups remove temporaries."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))


def make_gguf(hf_dir, out, type_name, pre=None, name=None, log=print):
    """Writes OUT from HF_DIR; returns a summary dict (types per tensor, fallbacks, size, time)."""
    if type_name not in TYPES:
        raise BadInput(f"--type {type_name!r}: choose one of {', '.join(TYPES)}")
    qtype, file_type = TYPES[type_name]
    t0 = time.time()
    cfg_path = os.path.join(hf_dir, "config.json")
    cfg = read_json(cfg_path)
    if cfg.get("model_type") != "llama":
        raise BadInput(f"{cfg_path}: model_type {cfg.get('model_type')!r}; only llama is written")
    weights = Weights(hf_dir)
    plan = tensor_plan(cfg, cfg_path, weights)
    vocab = vocabulary(hf_dir, cfg, pre)
    tmp = tmp_name(out)
    w = gguf.GGUFWriter(tmp, "llama")
    counts, fallbacks, shapes = {}, [], {}
    try:
        add_metadata(w, cfg, cfg_path, vocab, file_type,
                     name or os.path.basename(os.path.abspath(hf_dir)))
        for gg, hf, perm in plan:
            shape = weights.shape(hf)
            gtype, why = target_type(shape, qtype)
            if why:
                fallbacks.append(f"{gg} -> {gtype.name} ({why})")
            counts[gtype.name] = counts.get(gtype.name, 0) + 1
            shapes[gg] = (shape, gtype)
            if gtype in (Q.F32, Q.F16):
                np_dtype = np.float32 if gtype == Q.F32 else np.float16
                nbytes = int(np.prod(shape)) * np.dtype(np_dtype).itemsize
                w.add_tensor_info(gg, shape, np.dtype(np_dtype), nbytes)
            else:
                bshape = gguf.quant_shape_to_byte_shape(shape, gtype)
                w.add_tensor_info(gg, bshape, np.dtype(np.uint8), int(np.prod(bshape)), raw_dtype=gtype)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for k, (gg, hf, perm) in enumerate(plan):
            shape, gtype = shapes[gg]
            w.write_tensor_data(encode(weights, hf, shape, perm, gtype))
            if log and (k + 1) % 50 == 0:
                log(f"  {k + 1}/{len(plan)} tensors, {time.time() - t0:.0f} s")
        w.close()
        os.replace(tmp, out)
    except BaseException:
        w.close()
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    summary = {"out": out, "type": type_name, "tensors": counts, "fallbacks": fallbacks,
               "bytes": os.path.getsize(out), "seconds": time.time() - t0}
    if log:
        log(f"wrote {out}: {summary['bytes'] / 1e9:.3f} GB in {summary['seconds']:.1f} s; "
            f"tensor types {counts}; pre-tokenizer {vocab['pre']}")
        for f in fallbacks:
            log(f"  kept wider: {f}")
    return summary


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hf", required=True, help="Hugging Face checkpoint directory (Llama family)")
    ap.add_argument("--out", required=True, help="GGUF file to write")
    ap.add_argument("--type", required=True, choices=list(TYPES))
    ap.add_argument("--pre", help="tokenizer.ggml.pre (default: recognised from tokenizer.json)")
    ap.add_argument("--name", help="general.name (default: the directory's name)")
    a = ap.parse_args()
    exit_on_sigterm()
    try:
        make_gguf(a.hf, a.out, a.type, pre=a.pre, name=a.name)
    except BadInput as e:
        sys.exit(f"make_gguf: {e}")


if __name__ == "__main__":
    main()
