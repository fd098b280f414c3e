"""Type stubs of the extension module. Users call the wrappers in ``safety_layers``; these take
the progress callback ``progress(n_done: int, info: Optional[str])`` explicitly."""

from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import numpy as np
import numpy.typing as npt

__version__: str

_Progress = Optional[Callable[[int, Optional[str]], None]]
_Prompts = Union[str, List[str]]

class Model:
    @staticmethod
    def load(model: str, dtype: str = "auto", device: Optional[str] = None) -> "Model": ...
    @property
    def info(self) -> Dict[str, Any]: ...
    @property
    def name(self) -> str: ...
    @property
    def num_layers(self) -> int: ...
    @property
    def scaling(self) -> Optional[Tuple[int, int, float]]: ...
    def hidden_states(
        self,
        prompts: _Prompts,
        template: str = "alpaca",
        entries: Optional[List[int]] = None,
        batch_size: int = 16,
        progress: _Progress = None,
    ) -> npt.NDArray[np.float32]: ...
    def run_with_cache(
        self,
        prompts: _Prompts,
        hooks: List[str],
        template: str = "alpaca",
        positions: str = "last",
        batch_size: int = 16,
    ) -> Tuple[npt.NDArray[np.float32], Dict[str, npt.NDArray[np.float32]]]: ...
    def generate(
        self,
        prompts: _Prompts,
        max_new_tokens: int = 16,
        template: str = "alpaca",
        batch_size: int = 16,
        ignore_eos: bool = False,
        progress: _Progress = None,
    ) -> List[str]: ...
    def scaled(self, range: str, alpha: float) -> "Scaled": ...

class Scaled:
    def __enter__(self) -> Model: ...
    def __exit__(self, *exc: Any) -> bool: ...

def cosine(
    model: Model,
    normal: Optional[_Prompts] = None,
    malicious: Optional[_Prompts] = None,
    template: str = "alpaca",
    pairs: str = "500",
    seed: int = 0,
    compare: Optional[Model] = None,
    batch_size: int = 16,
    out: Optional[str] = None,
    progress: _Progress = None,
) -> Dict[str, Any]: ...
def locate(
    model: Model,
    over_rejection: Optional[_Prompts] = None,
    initial: Optional[str] = None,
    cosine: Optional[str] = None,
    alpha: str = "auto",
    std_threshold: float = 15.0,
    judge: str = "union",
    refusal_list: Optional[str] = None,
    max_new_tokens: int = 16,
    span: int = 2,
    batch_size: int = 32,
    template: str = "alpaca",
    limit: Optional[int] = None,
    prefix_cache: bool = False,
    early_stop: bool = True,
    out: Optional[str] = None,
    progress: _Progress = None,
) -> Dict[str, Any]: ...
def finetune(
    model: str,
    data: str,
    out: str,
    freeze: Optional[str] = None,
    freeze_from: Optional[str] = None,
    freeze_modules: List[str] = ...,
    epochs: int = 3,
    lr: float = 1e-4,
    lr_schedule: str = "linear",
    warmup_steps: int = 100,
    batch_size: int = 4,
    grad_accum: int = 1,
    max_len: int = 256,
    weight_decay: float = 0.0,
    max_grad_norm: float = 1.0,
    template: str = "alpaca",
    train_on_inputs: bool = True,
    holdout: int = 100,
    limit: Optional[int] = None,
    seed: int = 42,
    shuffle: bool = True,
    max_steps: Optional[int] = None,
    save_every: Optional[int] = None,
    resume: bool = False,
    keep_checkpoints: bool = False,
    grad_checkpointing: bool = False,
    freeze_embeddings: bool = False,
    mixed_precision: str = "no",
    dtype: str = "auto",
    device: Optional[str] = None,
    progress: _Progress = None,
) -> Dict[str, Any]: ...
def evaluate(
    models: List[Tuple[str, Model]],
    harmful: str = "advbench",
    over_rejection: str = "over-rejection",
    xstest: str = "xstest",
    utility: str = "finetune-normal",
    utility_n: int = 100,
    utility_take: str = "last",
    judge: str = "union",
    refusal_list: Optional[str] = None,
    probe_threshold: Optional[float] = None,
    max_new_tokens: int = 64,
    utility_max_new_tokens: int = 128,
    template: str = "alpaca",
    batch_size: int = 32,
    score_tokens: int = 1024,
    limit: Optional[int] = None,
    out: Optional[str] = None,
    progress: _Progress = None,
) -> Dict[str, Any]: ...
