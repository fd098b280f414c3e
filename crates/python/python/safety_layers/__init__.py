"""safety_layers: find the safety layers of aligned chat LLMs (Li et al., ICLR 2025) from Python.

The engine and the analyses are the Rust ones the ``safety-layers`` CLI runs, so a result here
is the CLI's result: the same numbers, and with ``out=`` the same files.

    >>> import safety_layers as sl
    >>> model = sl.Model.load("smollm2-135m-instruct")
    >>> h = model.hidden_states(["Name three colours."])    # numpy [prompts, entries, hidden]
    >>> res = sl.cosine(model, pairs="all")
    >>> import pandas as pd; pd.DataFrame(res.entries)      # one row per hidden-state entry

Long calls release the GIL, show a tqdm bar when tqdm is installed (``progress=False`` hides
it) and stop at Ctrl-C with ``KeyboardInterrupt``. Engine errors raise ``ValueError`` (a missing
file ``FileNotFoundError``) with the CLI's message.
"""

from __future__ import annotations

import os
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

from . import _native
from ._results import (
    CosineEntry,
    CosineResult,
    EvalResult,
    FinetuneResult,
    LocateResult,
    SweepRow,
)

__version__ = _native.__version__
__all__ = [
    "Model",
    "cosine",
    "locate",
    "finetune",
    "evaluate",
    "EvalResult",
    "CosineEntry",
    "CosineResult",
    "LocateResult",
    "SweepRow",
    "FinetuneResult",
]

#: Prompts: a list of strings, or a prompt file / dataset name as the CLI's --prompts.
Prompts = Union[str, "os.PathLike[str]", Sequence[str]]


class _Bar:
    """A tqdm bar when tqdm is importable (the notebook flavour inside Jupyter), else nothing;
    its ``update`` is the callback the engine calls as ``update(n_done, info)``."""

    def __init__(self, desc: str, total: Optional[int], enabled: bool) -> None:
        self._bar = None
        if not enabled:
            return
        try:
            from tqdm.auto import tqdm
        except ImportError:
            return
        self._bar = tqdm(total=total, desc=desc, leave=False)

    def update(self, n: int, info: Optional[str] = None) -> None:
        if self._bar is not None:
            self._bar.update(n)
            if info:
                self._bar.set_postfix_str(info, refresh=False)

    def __enter__(self) -> "_Bar":
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._bar is not None:
            self._bar.close()


def _count(prompts: Optional[Prompts]) -> Optional[int]:
    if prompts is None or isinstance(prompts, (str, os.PathLike)):
        return None
    return len(prompts)


def _prompts(prompts: Optional[Prompts]) -> Any:
    # A bare string is a file or dataset name, as the CLI's --prompts; a list holds prompts.
    if prompts is None or isinstance(prompts, (str, os.PathLike)):
        return prompts
    return [str(p) for p in prompts]


class Model:
    """A loaded checkpoint: a Hugging Face directory, a .gguf file or a catalog name.

    Weights stay in Rust; the methods return NumPy arrays and strings.
    """

    __slots__ = ("_m",)

    def __init__(self, native: "_native.Model") -> None:
        self._m = native

    @classmethod
    def load(cls, model: Union[str, "os.PathLike[str]"], dtype: str = "auto",
             device: Optional[str] = None) -> "Model":
        """Loads ``model``: a path, or a catalog name (e.g. ``smollm2-135m-instruct``) looked
        up in SAFETY_LAYERS_MODELS and the cache as by the CLI. ``dtype`` is the weights'
        precision: ``auto`` (the checkpoint's own for 1B parameters and more, f32 below),
        ``f32``, ``bf16``, ``f16`` or ``native``; ``device`` is ``cpu``, ``cuda`` or ``cuda:N``
        (default: the build's). Raises FileNotFoundError for a path that is not there and not
        a catalog name, ValueError for a checkpoint that cannot be read."""
        return cls(_native.Model.load(os.fspath(model), dtype, device))

    @property
    def info(self) -> dict:
        """What ``safety-layers inspect --json`` prints: family, layers, hidden_size,
        parameters, storage and dtype, device, EOS ids..."""
        return self._m.info

    @property
    def name(self) -> str:
        """The model as it was named when loaded (recorded in result files)."""
        return self._m.name

    @property
    def num_layers(self) -> int:
        return self._m.num_layers

    @property
    def scaling(self) -> Optional[tuple]:
        """``(first, last, alpha)`` inside a ``scaled()`` context, else None."""
        return self._m.scaling

    def hidden_states(self, prompts: Prompts, template: str = "alpaca",
                      entries: Optional[Sequence[int]] = None, batch_size: int = 16,
                      progress: bool = True):
        """Last-token hidden states, ``numpy.ndarray`` of float32 ``[prompts, entries, hidden]``.

        Entry 0 is the embedding output, entry k the input of layer k, the last one the output
        after the final norm (transformers' ``output_hidden_states``); ``entries`` picks some
        (negative indices count from the end). ``prompts`` is a list of strings, or a prompt
        file / dataset name as the CLI's ``--prompts``; ``template`` is ``alpaca`` (the
        paper's), ``chat`` or ``raw``. The numbers are the CLI's ``hidden`` command's.
        """
        with _Bar("hidden states", _count(prompts), progress) as bar:
            return self._m.hidden_states(_prompts(prompts), template,
                                         None if entries is None else list(entries),
                                         batch_size, bar.update)

    def run_with_cache(self, prompts: Prompts, hooks: Sequence[str], template: str = "alpaca",
                       positions: str = "last", batch_size: int = 16):
        """``(logits, cache)``: logits at each prompt's last token ``[prompts, vocab]`` and a
        dict from hook name (``resid_pre.K``, ``resid_post.K``, ``attn_out.K``, ``mlp_out.K``,
        ``hidden.K``, ``final_norm``) to its activations: ``[prompts, hidden]`` at
        ``positions="last"``, ``[prompts, tokens, hidden]`` left-padded with zeros at
        ``"all"``."""
        return self._m.run_with_cache(_prompts(prompts), list(hooks), template, positions,
                                      batch_size)

    def generate(self, prompts: Prompts, max_new_tokens: int = 16, template: str = "alpaca",
                 batch_size: int = 16, ignore_eos: bool = False,
                 progress: bool = True) -> List[str]:
        """Greedy continuations, decoded without special tokens (the CLI's ``generate``).
        Inside ``with model.scaled(...)`` they come from the scaled model."""
        with _Bar("generate", _count(prompts), progress) as bar:
            return self._m.generate(_prompts(prompts), max_new_tokens, template, batch_size,
                                    ignore_eos, bar.update)

    def scaled(self, layers: str, alpha: float) -> "_Scaled":
        """``with model.scaled("6-12", 1.2):`` scales the attention and MLP weights of layers
        6..12 (0-indexed, inclusive) by 1.2, the paper's intervention, and puts the original
        weights back on exit, exactly, also when the block raises. A bad range or alpha raises
        ValueError here; contexts do not nest."""
        return _Scaled(self, self._m.scaled(layers, float(alpha)))

    def __repr__(self) -> str:
        return repr(self._m)


class _Scaled:
    """What ``Model.scaled`` returns: a context manager that yields the model."""

    def __init__(self, model: Model, native: Any) -> None:
        self._model = model
        self._native = native

    def __enter__(self) -> Model:
        self._native.__enter__()
        return self._model

    def __exit__(self, *exc: Any) -> bool:
        return self._native.__exit__(*exc)


def cosine(model: "Model", normal: Optional[Prompts] = None,
           malicious: Optional[Prompts] = None, *, template: str = "alpaca",
           pairs: Union[int, str] = 500, seed: int = 0, compare: Optional["Model"] = None,
           batch_size: int = 16, out: Union[str, "os.PathLike[str]", None] = None,
           progress: bool = True) -> CosineResult:
    """The paper's cosine analysis (§3.2-3.3): where N-M similarity falls away from N-N.

    ``normal``/``malicious`` default to the paper's sets (``paper-normal``/``paper-malicious``,
    from SAFETY_LAYERS_DATA or the cache); ``pairs`` is pairs per type or ``"all"``; ``compare``
    is a second model drawn in the same figures. With ``out`` the CLI's files are written there
    (cosine.json, cosine.csv, cosine.svg, angle_gap.svg).
    """
    with _Bar(f"cosine {model.name}", None, progress) as bar:
        doc = _native.cosine(model._m, _prompts(normal), _prompts(malicious), template,
                             str(pairs), seed, None if compare is None else compare._m, batch_size, _path(out), bar.update)
    return CosineResult.from_json(doc)


def locate(model: "Model", over_rejection: Optional[Prompts] = None, *,
           initial: Union[str, Tuple[int, int], CosineResult, None] = None, cosine: Union[str, "os.PathLike[str]", None] = None,
           alpha: Union[float, str] = "auto", std_threshold: float = 15.0, judge: str = "union",
           refusal_list: Union[str, "os.PathLike[str]", None] = None, max_new_tokens: int = 16,
           span: int = 2, batch_size: int = 32, template: str = "alpaca",
           limit: Optional[int] = None, prefix_cache: bool = False, early_stop: bool = True,
           out: Union[str, "os.PathLike[str]", None] = None,
           progress: bool = True) -> LocateResult:
    """The paper's localisation (§3.4-3.5): scale layer ranges by ``alpha``, count
    over-rejections on ``over_rejection`` (default: the ``over-rejection`` dataset), sweep the
    upper then the lower bound from ``initial`` ("I-J", ``(i, j)`` or a ``cosine()`` result's
    initial range) or the range a ``cosine.json`` file found.
    With ``out`` the CLI's files are written there (locate.json, .csv, .svg, responses/).
    The model's weights are back to the original afterwards, also after an error or Ctrl-C.
    """
    if isinstance(initial, CosineResult):
        if initial.initial_range is None:
            raise ValueError(f"the cosine analysis of {initial.model} found no initial range "
                             "(no gap opens); give initial=\"I-J\"")
        initial = initial.initial_range
    if isinstance(initial, tuple):
        initial = f"{initial[0]}-{initial[1]}"
    with _Bar("locate (prompts judged)", None, progress) as bar:
        doc = _native.locate(model._m, _prompts(over_rejection), initial, _path(cosine),
                             str(alpha), std_threshold, judge, _path(refusal_list), max_new_tokens, span,
                             batch_size, template, limit, prefix_cache, early_stop, _path(out),
                             bar.update)
    return LocateResult.from_json(doc)


def finetune(model: Union[str, "os.PathLike[str]"], data: Union[str, "os.PathLike[str]"],
             out: Union[str, "os.PathLike[str]"], *, freeze: Optional[str] = None,
             freeze_from: Union[str, "os.PathLike[str]", None] = None,
             freeze_modules: Sequence[str] = ("attn", "mlp"), epochs: int = 3, lr: float = 1e-4,
             lr_schedule: str = "linear", warmup_steps: int = 100, batch_size: int = 4,
             grad_accum: int = 1, max_len: int = 256, weight_decay: float = 0.0,
             max_grad_norm: float = 1.0, template: str = "alpaca", train_on_inputs: bool = True,
             holdout: int = 100, limit: Optional[int] = None, seed: int = 42,
             shuffle: bool = True, max_steps: Optional[int] = None,
             save_every: Optional[int] = None, resume: bool = False,
             keep_checkpoints: bool = False, grad_checkpointing: bool = False,
             freeze_embeddings: bool = False, mixed_precision: str = "no", dtype: str = "auto",
             device: Optional[str] = None, progress: bool = True) -> FinetuneResult:
    """Fine-tuning as the CLI's ``finetune``: SPPFT with ``freeze="I-J"`` (or ``freeze_from`` a
    locate.json), full fine-tuning without. ``model`` is a path or catalog name (loaded for
    training in f32); ``data`` a JSON/JSONL file of {instruction, input, output} or a dataset
    name. Writes the fine-tuned model, finetune.json and train_log.jsonl into ``out``.
    ``mixed_precision="bf16"``: the linear layers' products in bf16 with f32 sums (torch's bf16
    autocast; on AMX tiles where the CPU has them), weights and optimizer state in f32.
    """
    with _Bar("finetune (steps)", None, progress) as bar:
        doc = _native.finetune(
            _path(model), str(data), _path(out), freeze, _path(freeze_from),
            list(freeze_modules), epochs, lr, lr_schedule, warmup_steps, batch_size, grad_accum,
            max_len, weight_decay, max_grad_norm, template, train_on_inputs, holdout, limit, seed,
            shuffle, max_steps, save_every, resume, keep_checkpoints, grad_checkpointing,
            freeze_embeddings, mixed_precision, dtype, device, bar.update)
    return FinetuneResult.from_json(doc, os.fspath(out))


def evaluate(models: Union["Model", Sequence["Model"], Dict[str, "Model"]], *,
             harmful: str = "advbench", over_rejection: str = "over-rejection",
             xstest: str = "xstest", utility: str = "finetune-normal", utility_n: int = 100,
             utility_take: str = "last", judge: str = "union",
             refusal_list: Union[str, "os.PathLike[str]", None] = None,
             probe_threshold: Optional[float] = None, max_new_tokens: int = 64,
             utility_max_new_tokens: int = 128, template: str = "alpaca", batch_size: int = 32,
             score_tokens: int = 1024, limit: Optional[int] = None,
             out: Union[str, "os.PathLike[str]", None] = None,
             progress: bool = True) -> EvalResult:
    """The paper's Table 2 columns as the CLI's ``eval``, one row per model: R_h on
    ``harmful``, refusal rates on ``over_rejection`` and XSTest safe/unsafe (each with a 95%
    Wilson interval), Rouge-L and perplexity on the last ``utility_n`` records of ``utility``.
    Each set is a file or dataset name, or ``"none"`` to skip it. ``models`` is a Model, a list
    of them (rows labelled from their names) or a dict ``{label: Model}``. With ``out`` the
    CLI's files are written there (eval.json, .csv, .md, .svg, responses/). Unlike the CLI,
    which writes a failed row and goes on, the first model that fails raises.
    """
    if isinstance(models, Model):
        pairs = [("", models._m)]
    elif isinstance(models, dict):
        pairs = [(str(k), m._m) for k, m in models.items()]
    else:
        pairs = [("", m._m) for m in models]
    with _Bar("eval", None, progress) as bar:
        doc = _native.evaluate(pairs, harmful, over_rejection, xstest, utility, utility_n,
                               utility_take, judge, _path(refusal_list), probe_threshold,
                               max_new_tokens, utility_max_new_tokens, template, batch_size,
                               score_tokens, limit, _path(out), bar.update)
    return EvalResult.from_json(doc)


def _path(p: Any) -> Optional[str]:
    return None if p is None else os.fspath(p)
