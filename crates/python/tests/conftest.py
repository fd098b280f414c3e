"""Shared fixtures: the repository, the CLI binary the results are compared with, SmolLM2."""

import json
import os
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest

import safety_layers as sl

ROOT = Path(__file__).resolve().parents[3]
SMOL = "smollm2-135m-instruct"


def _need_env():
    missing = [v for v in ("SAFETY_LAYERS_DATA", "SAFETY_LAYERS_MODELS") if not os.environ.get(v)]
    if missing:
        raise RuntimeError(f"set {', '.join(missing)} (see crates/python/ci.sh)")


@pytest.fixture(scope="session")
def root() -> Path:
    return ROOT


@pytest.fixture(scope="session")
def cli():
    """Runs the `safety-layers` binary (SAFETY_LAYERS_BIN, else target/release) and fails the
    test with its stderr when it fails."""
    _need_env()
    binary = os.environ.get("SAFETY_LAYERS_BIN", str(ROOT / "target/release/safety-layers"))
    if not Path(binary).is_file():
        raise RuntimeError(f"{binary}: build it with `cargo build --release -p safety-layers`")

    def run(*args):
        p = subprocess.run([binary, *map(str, args)], capture_output=True, text=True)
        assert p.returncode == 0, f"safety-layers {' '.join(map(str, args))}:\n{p.stderr}"
        return p

    return run


@pytest.fixture(scope="session")
def smol():
    _need_env()
    return sl.Model.load(SMOL)


def read_safetensors(path):
    """The tensors of a safetensors file as NumPy arrays (the format is an 8-byte header length,
    a JSON header, then the data), so the tests need no extra package."""
    raw = Path(path).read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    out = {}
    for name, t in header.items():
        if name == "__metadata__":
            continue
        assert t["dtype"] == "F32", t
        a, b = t["data_offsets"]
        out[name] = np.frombuffer(raw[8 + n + a:8 + n + b], dtype="<f4").reshape(t["shape"])
    return out, header.get("__metadata__", {})
