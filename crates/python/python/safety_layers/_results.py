"""Results as dataclasses. Each keeps the whole JSON document the CLI writes (``raw``) and
offers ``to_records()``, a list of flat dicts that ``pandas.DataFrame`` takes directly (as it
takes the lists of row dataclasses, e.g. ``CosineResult.entries``)."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple


@dataclass(frozen=True)
class CosineEntry:
    """One hidden-state entry's pair statistics (a row of cosine.csv)."""

    model: str
    #: transformers' hidden-state index: 0 = embeddings, e = output of layer e-1.
    entry: int
    #: ``entry - 1`` (-1 = the embeddings).
    layer: int
    nn_mean: float
    nn_std: float
    mm_mean: float
    mm_std: float
    nm_mean: float
    nm_std: float
    #: deg(acos(mean N-M)) - deg(acos(mean N-N)): what the paper's code plots.
    gap_code_deg: float
    #: mean angle(n, m) - mean angle(n, n'): the paper's formula.
    gap_paper_deg: float


def _entries(run: Dict[str, Any]) -> List[CosineEntry]:
    names = [f.name for f in dataclasses.fields(CosineEntry)]
    return [
        CosineEntry(model=run["model"], layer=e["entry"] - 1,
                    **{k: e[k] for k in names if k not in ("model", "layer")})
        for e in run["entries"]
    ]


def _range(r: Optional[Dict[str, Any]]) -> Optional[Tuple[int, int]]:
    return None if r is None else (r["first"], r["last"])


@dataclass(frozen=True)
class CosineResult:
    """The cosine analysis of one model (and the ``compare`` model's curves, if any)."""

    model: str
    #: The initial safety range ``(first, last)`` read off the angle gap, or None.
    initial_range: Optional[Tuple[int, int]]
    #: The entries of the analysed model, then those of the compared one.
    entries: List[CosineEntry]
    pairs: Dict[str, Any]
    rule: str
    #: cosine.json as written by the CLI.
    raw: Dict[str, Any] = field(repr=False)

    @classmethod
    def from_json(cls, doc: Dict[str, Any]) -> "CosineResult":
        entries = _entries(doc)
        if doc.get("compare"):
            entries += _entries(doc["compare"])
        return cls(model=doc["model"], initial_range=_range(doc["initial_range"]),
                   entries=entries, pairs=doc["pair_counts"], rule=doc["rule"], raw=doc)

    def to_records(self) -> List[Dict[str, Any]]:
        """One dict per (model, entry): the columns of cosine.csv."""
        return [dataclasses.asdict(e) for e in self.entries]


@dataclass(frozen=True)
class SweepRow:
    """One range tried by a bound sweep (a row of locate.csv)."""

    sweep: str
    alpha: float
    baseline: int
    first: int
    last: int
    refusals: int
    #: The range this sweep kept.
    best: bool


@dataclass(frozen=True)
class LocateResult:
    """The localisation: the chosen safety layers and every range tried."""

    model: str
    #: The chosen safety layers ``(first, last)``.
    range: Tuple[int, int]
    initial_range: Tuple[int, int]
    alpha: float
    #: Refusals of the unscaled model, out of ``queries``.
    baseline: int
    queries: int
    rows: List[SweepRow]
    #: locate.json as written by the CLI.
    raw: Dict[str, Any] = field(repr=False)

    @classmethod
    def from_json(cls, doc: Dict[str, Any]) -> "LocateResult":
        rows = []
        for s in (doc["upper_sweep"], doc["lower_sweep"]):
            best = (s["best"]["first"], s["best"]["last"])
            for r, count in s["tried"]:
                rows.append(SweepRow(sweep=s["kind"], alpha=s["alpha"],
                                     baseline=doc["baseline"], first=r["first"], last=r["last"],
                                     refusals=count, best=(r["first"], r["last"]) == best))
        return cls(model=doc["meta"]["model"], range=_range(doc["range"]),
                   initial_range=_range(doc["initial_range"]), alpha=doc["alpha"],
                   baseline=doc["baseline"], queries=doc["queries"], rows=rows, raw=doc)

    def to_records(self) -> List[Dict[str, Any]]:
        """One dict per range tried: the columns of locate.csv."""
        return [dataclasses.asdict(r) for r in self.rows]


@dataclass(frozen=True)
class FinetuneResult:
    """A finished fine-tuning run (finetune.json) and its training log."""

    out: str
    steps: int
    tokens: int
    final_loss: Optional[float]
    trainable_parameters: int
    frozen_parameters: int
    frozen_tensors_identical: bool
    #: finetune.json as written by the CLI.
    raw: Dict[str, Any] = field(repr=False)

    @classmethod
    def from_json(cls, doc: Dict[str, Any], out: str) -> "FinetuneResult":
        return cls(out=out, steps=doc["steps"], tokens=doc["tokens"],
                   final_loss=doc["final_loss"],
                   trainable_parameters=doc["trainable_parameters"],
                   frozen_parameters=doc["frozen_parameters"],
                   frozen_tensors_identical=doc["frozen_tensors_identical"], raw=doc)

    def to_records(self) -> List[Dict[str, Any]]:
        """The lines of train_log.jsonl: one dict per optimizer step (loss, lr, ...) and one
        per epoch's held-out loss."""
        path = os.path.join(self.out, "train_log.jsonl")
        with open(path, encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]


def _cell(v: str) -> Any:
    if v == "":
        return None
    for conv in (int, float):
        try:
            return conv(v)
        except ValueError:
            pass
    return v


@dataclass(frozen=True)
class EvalResult:
    """The paper's Table 2 columns, one row per model (eval.json, eval.csv, eval.md)."""

    #: eval.csv's rows: label, model, then per set ``<set>_rate``, ``<set>_ci95_low``... and
    #: ``rouge_l_f1``, ``perplexity``.
    rows: List[Dict[str, Any]]
    #: eval.md, the table as the CLI prints it.
    markdown: str
    #: eval.json as written by the CLI.
    raw: Dict[str, Any] = field(repr=False)

    @classmethod
    def from_json(cls, doc: Dict[str, Any]) -> "EvalResult":
        rows = [{k: _cell(v) for k, v in r.items()}
                for r in csv.DictReader(io.StringIO(doc["csv"]))]
        return cls(rows=rows, markdown=doc["markdown"], raw=doc["eval"])

    def to_records(self) -> List[Dict[str, Any]]:
        """eval.csv's rows as dicts (numbers as numbers, empty cells as None)."""
        return [dict(r) for r in self.rows]
