"""Name-level check of `safety-layers export` against transformers' real parameter names.

For configs with the shapes of real checkpoints (Llama-3-8B, Llama-2-7B, Phi-3-mini, Qwen2-7B,
Qwen3-0.6B, gemma-2b, gemma-2-2b, gemma-3-1b, Mistral-7B), the model is built on the meta device (no memory, no weights)
and every export is checked name by name:
- freeze_plan.json: its frozen + trainable lists are exactly the model's named_parameters, and the
  frozen ones are exactly the parameters of the frozen submodules of the range's layers (found by
  walking the modules, not by name patterns);
- axolotl: unfrozen_parameters applied as axolotl applies them (both its current rule, which
  escapes every `.` not before `+`, and its first one, which escapes every `.`; then re.match)
  unfreeze exactly the trainable set;
- peft: target_modules / layers_to_transform / layers_pattern, matched as PEFT's
  check_target_module_exists does, select exactly the linear layers of the trainable
  attention/MLP submodules (and PEFT itself agrees, where it is installed);
- hf-trainer: train_sppft.py, imported, sets requires_grad False on exactly the frozen set.

Usage: python3 export_names.py PATH/TO/safety-layers
"""
import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
import time

import torch
import transformers
import yaml
from transformers import AutoConfig, AutoModelForCausalLM

T0 = time.time()
FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "..", "tests", "fixtures")

# Shapes of the real checkpoints (their config.json values that decide parameter names/counts).
CONFIGS = {
    "llama3-8b": {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336,
                  "num_attention_heads": 32, "num_key_value_heads": 8, "num_hidden_layers": 32, "vocab_size": 128256,
                  "rope_theta": 500000.0, "rms_norm_eps": 1e-5, "max_position_embeddings": 8192, "tie_word_embeddings": False,
                  "bos_token_id": 128000, "eos_token_id": 128009},
    "llama2-7b": {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096, "intermediate_size": 11008,
                  "num_attention_heads": 32, "num_key_value_heads": 32, "num_hidden_layers": 32, "vocab_size": 32000,
                  "rms_norm_eps": 1e-5, "max_position_embeddings": 4096, "tie_word_embeddings": False},
    "phi3-mini": {"architectures": ["Phi3ForCausalLM"], "model_type": "phi3", "hidden_size": 3072, "intermediate_size": 8192,
                  "num_attention_heads": 32, "num_key_value_heads": 32, "num_hidden_layers": 32, "vocab_size": 32064,
                  "max_position_embeddings": 4096, "original_max_position_embeddings": 4096, "sliding_window": 2047,
                  "rope_theta": 10000.0, "rope_scaling": None, "rms_norm_eps": 1e-5, "tie_word_embeddings": False},
    "qwen2-7b": {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 3584, "intermediate_size": 18944,
                 "num_attention_heads": 28, "num_key_value_heads": 4, "num_hidden_layers": 28, "vocab_size": 152064,
                 "max_position_embeddings": 32768, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
                 "use_sliding_window": False, "sliding_window": 131072, "max_window_layers": 28},
    "qwen3-0.6b": {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "hidden_size": 1024, "intermediate_size": 3072,
                   "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 128, "num_hidden_layers": 28,
                   "vocab_size": 151936, "max_position_embeddings": 40960, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6,
                   "tie_word_embeddings": True, "attention_bias": False},
    "gemma-2b": {"architectures": ["GemmaForCausalLM"], "model_type": "gemma", "hidden_size": 2048, "intermediate_size": 16384,
                 "num_attention_heads": 8, "num_key_value_heads": 1, "head_dim": 256, "num_hidden_layers": 18, "vocab_size": 256000,
                 "max_position_embeddings": 8192, "hidden_act": "gelu", "rms_norm_eps": 1e-6},
    "gemma2-2b": {"architectures": ["Gemma2ForCausalLM"], "model_type": "gemma2", "hidden_size": 2304, "intermediate_size": 9216,
                  "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256, "num_hidden_layers": 26, "vocab_size": 256000,
                  "max_position_embeddings": 8192, "hidden_activation": "gelu_pytorch_tanh", "query_pre_attn_scalar": 256,
                  "sliding_window": 4096, "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0, "rms_norm_eps": 1e-6},
    "gemma3-1b": {"architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text", "hidden_size": 1152, "intermediate_size": 6912,
                  "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 256, "num_hidden_layers": 26, "vocab_size": 262144,
                  "max_position_embeddings": 32768, "query_pre_attn_scalar": 256, "sliding_window": 512, "sliding_window_pattern": 6,
                  "rope_theta": 1000000.0, "rope_local_base_freq": 10000.0, "rms_norm_eps": 1e-6},
    "mistral-7b": {"architectures": ["MistralForCausalLM"], "model_type": "mistral", "hidden_size": 4096, "intermediate_size": 14336,
                   "num_attention_heads": 32, "num_key_value_heads": 8, "num_hidden_layers": 32, "vocab_size": 32768,
                   "max_position_embeddings": 32768, "rope_theta": 1000000.0, "rms_norm_eps": 1e-5, "sliding_window": None},
}

# (config, range, --freeze-modules, how the range is given)
CASES = [
    ("llama3-8b", (6, 12), "attn,mlp", "freeze"),
    ("llama3-8b", (6, 12), "attn", "freeze"),
    ("llama2-7b", (6, 14), "attn,mlp", "locate"),
    ("phi3-mini", (11, 15), "attn,mlp", "freeze"),
    ("phi3-mini", (11, 15), "mlp", "freeze"),
    ("qwen2-7b", (0, 3), "mlp", "freeze"),
    ("qwen3-0.6b", (27, 27), "attn", "freeze"),
    ("gemma-2b", (6, 11), "attn,mlp", "freeze"),
    ("gemma2-2b", (6, 11), "attn,mlp", "freeze"),
    ("gemma3-1b", (5, 9), "attn,mlp", "freeze"),
    ("mistral-7b", (8, 13), "attn,mlp", "locate"),
]
FORMATS = ["axolotl", "peft", "hf-trainer"]
HF_MODULE = {"attn": "self_attn", "mlp": "mlp"}

try:  # PEFT's own matching, where PEFT is installed; the rule below stands in for it otherwise
    from peft.tuners.tuners_utils import check_target_module_exists as peft_check
except Exception:  # noqa: BLE001 - any import failure means "not available"
    peft_check = None


def build(cfg_dir):
    config = AutoConfig.from_pretrained(cfg_dir)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def oracle(model, first, last, modules):
    """Frozen parameter names, found by walking the frozen submodules of the range's layers."""
    frozen = set()
    for layer in range(first, last + 1):
        block = model.model.layers[layer]
        for m in modules:
            sub = getattr(block, HF_MODULE[m])
            prefix = f"model.layers.{layer}.{HF_MODULE[m]}."
            frozen |= {prefix + n for n, _ in sub.named_parameters()}
    return frozen


def axolotl_unfrozen(names, patterns, escape_all):
    """axolotl's freeze_layers_except: every parameter frozen, then those a pattern re.match-es
    unfrozen. A trailing [start:end] is an index range there; our patterns must not use it."""
    compiled = []
    for p in patterns:
        assert not re.match(r"^(.+)\[([0-9]*)(?::([0-9]*))?\]$", p), f"{p!r} would be read as an index range"
        body = p.replace(".", "\\.") if escape_all else re.sub(r"\.(?!\+)", "\\\\.", p)
        compiled.append(re.compile(body))
    return {n for n in names if any(c.match(n) is not None for c in compiled)}


class LoraCfg:
    def __init__(self, d):
        self.target_modules = d["target_modules"]
        self.layers_to_transform = d["layers_to_transform"]
        self.layers_pattern = d["layers_pattern"]
        self.exclude_modules = None
        self.modules_to_save = None
        self.target_parameters = None


def peft_rule(cfg, key):
    """PEFT's check_target_module_exists for these fields: a string is a full-match regex; a
    list matches a name or a `.name` suffix, then layers_to_transform filters by layer index."""
    if isinstance(cfg.target_modules, str):
        return re.fullmatch(cfg.target_modules, key) is not None
    if key in cfg.target_modules:
        return True
    found = any(key.endswith(f".{t}") for t in cfg.target_modules)
    if found and cfg.layers_to_transform:
        pats = [cfg.layers_pattern] if isinstance(cfg.layers_pattern, str) else (cfg.layers_pattern or [])
        m = None
        if not pats:
            m = re.match(r".*\.[^.]*\.(\d+)\.", key)
        for pat in pats:
            m = re.match(rf".*\.{pat}\.(\d+)\.", key)
            if m:
                break
        found = m is not None and int(m.group(1)) in cfg.layers_to_transform
    return found


def run_export(binary, work, name, rng, modules, how, fmt):
    out = os.path.join(work, f"{name}-{rng[0]}-{rng[1]}-{modules.replace(',', '+')}-{fmt}")
    args = [binary, "export", "--model", os.path.join(work, name), "--format", fmt, "--out", out,
            "--freeze-modules", modules, "--data", os.path.join(work, "data.json")]
    if how == "locate":
        loc = os.path.join(work, f"locate-{name}.json")
        # A real locate.json (the qwen2 fixture's) with this case's range.
        with open(os.path.join(FIXTURES, "locate", "locate.json")) as f:
            doc = json.load(f)
        doc["range"] = {"first": rng[0], "last": rng[1]}
        with open(loc, "w") as f:
            json.dump(doc, f)
        args += ["--freeze-from", loc]
    else:
        args += ["--freeze", f"{rng[0]}-{rng[1]}"]
    r = subprocess.run(args, capture_output=True, text=True)
    assert r.returncode == 0, f"export failed: {' '.join(args)}\n{r.stderr}"
    return out


def main():
    binary = sys.argv[1]
    checks = 0
    with tempfile.TemporaryDirectory() as work:
        with open(os.path.join(work, "data.json"), "w") as f:
            json.dump([{"instruction": "Say hi.", "input": "", "output": "Hi."}], f)
        for name, values in CONFIGS.items():
            os.makedirs(os.path.join(work, name))
            with open(os.path.join(work, name, "config.json"), "w") as f:
                json.dump(values, f)
        models = {}
        for name, (first, last), modules, how in CASES:
            if name not in models:
                models[name] = build(os.path.join(work, name))
            model, cfg = models[name], CONFIGS[name]
            params = dict(model.named_parameters())
            names = set(params)
            frozen = oracle(model, first, last, modules.split(","))
            trainable = names - frozen
            assert frozen, f"{name}: the oracle froze nothing"
            linears = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
            lora_want = {m for m in linears if re.match(r"model\.layers\.\d+\.(self_attn|mlp)\.", m) and f"{m}.weight" not in frozen}
            label = f"{name} {first}-{last} {modules}"
            for fmt in FORMATS:
                out = run_export(binary, work, name, (first, last), modules, how, fmt)
                plan = json.load(open(os.path.join(out, "freeze_plan.json")))
                got_f, got_t = set(plan["frozen_parameters"]), set(plan["trainable_parameters"])
                assert got_f | got_t == names and not got_f & got_t, \
                    f"{label}: plan names differ from transformers: missing {sorted(names - got_f - got_t)[:5]}, extra {sorted((got_f | got_t) - names)[:5]}"
                assert got_f == frozen, f"{label}: plan froze {sorted(got_f ^ frozen)[:5]} wrongly"
                assert plan["model"]["num_layers"] == cfg["num_hidden_layers"]
                if fmt == "axolotl":
                    y = yaml.safe_load(open(os.path.join(out, "axolotl.yaml")))
                    for escape_all in (False, True):
                        un = axolotl_unfrozen(names, y["unfrozen_parameters"], escape_all)
                        assert un == trainable, f"{label} axolotl (escape_all={escape_all}): wrong {sorted(un ^ trainable)[:5]}"
                    for k in ("learning_rate", "adam_epsilon", "weight_decay", "max_grad_norm"):
                        assert isinstance(y[k], float), f"{label}: {k} = {y[k]!r} does not read back as a float"
                    assert y["datasets"][0]["type"] == "alpaca" and y["num_epochs"] == 3 and y["train_on_inputs"] is True
                    ds = json.load(open(os.path.join(out, y["deepspeed"])))
                    assert ds["zero_optimization"]["stage"] == 2
                elif fmt == "peft":
                    ac = json.load(open(os.path.join(out, "adapter_config.json")))
                    assert ac["peft_type"] == "LORA" and ac["task_type"] == "CAUSAL_LM"
                    keys = [n for n, _ in model.named_modules()]
                    got = {k for k in keys if peft_rule(LoraCfg(ac), k)}
                    assert got == lora_want, f"{label} peft: wrong targets {sorted(got ^ lora_want)[:5]}"
                    if len(modules.split(",")) == 2:
                        outside = [l for l in range(cfg["num_hidden_layers"]) if not first <= l <= last]
                        assert ac["layers_to_transform"] == outside, f"{label}: layers_to_transform {ac['layers_to_transform']}"
                    if peft_check is not None:
                        from peft import LoraConfig
                        lc = LoraConfig.from_pretrained(out)
                        via_peft = {k for k in keys if peft_check(lc, k)}
                        assert via_peft == lora_want, f"{label} peft (installed): wrong targets {sorted(via_peft ^ lora_want)[:5]}"
                else:
                    spec = importlib.util.spec_from_file_location(f"train_sppft_{checks}", os.path.join(out, "train_sppft.py"))
                    mod = importlib.util.module_from_spec(spec)
                    spec.loader.exec_module(mod)
                    for p in params.values():
                        p.requires_grad_(True)
                    listed = mod.apply_freeze(model)
                    now_frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
                    assert now_frozen == frozen == set(listed), f"{label} hf-trainer: wrong {sorted(now_frozen ^ frozen)[:5]}"
                    assert mod.ALPACA.startswith("Below is an instruction") and mod.MAX_LEN == 256
                    ds = json.load(open(os.path.join(out, "ds_zero2.json")))
                    assert ds["zero_optimization"]["stage"] == 2
                    for p in params.values():
                        p.requires_grad_(True)
                checks += 1
            print(f"ok  {label}: {len(frozen)} of {len(names)} tensors frozen, {len(lora_want)} LoRA targets")
    peft_note = "PEFT installed: also checked with PEFT itself" if peft_check else "PEFT not installed: its matching rule re-implemented"
    print(f"{checks} exports checked against transformers {transformers.__version__} ({peft_note}) in {time.time() - T0:.1f} s")


if __name__ == "__main__":
    main()
