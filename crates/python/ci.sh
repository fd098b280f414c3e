#!/usr/bin/env bash
# The Python package end to end: build the wheel with maturin, install it into a fresh virtual
# environment, run the pytest suite and the notebook example. Needs SAFETY_LAYERS_DATA and
# SAFETY_LAYERS_MODELS (the tests compare with the CLI on SmolLM2); .ci/run sets them.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
cd "$root"
: "${SAFETY_LAYERS_DATA:?set SAFETY_LAYERS_DATA (the datasets directory)}"
: "${SAFETY_LAYERS_MODELS:?set SAFETY_LAYERS_MODELS (the directory holding the SmolLM2 GGUF)}"

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

# The tests compare with the CLI, built from the same tree. `--workspace`, not `-p safety-layers`:
# cargo unifies dependency features over the packages it is asked to build, and the CLI alone
# turns fewer on (num-complex, once_cell, syn) than the workspace's `cargo test`, which changes
# the hash of nearly every crate above them: `-p` rebuilt almost everything (~4 minutes on 2
# cores) where `--workspace --bins` links two binaries.
cargo build --release --workspace --bins
export SAFETY_LAYERS_BIN="$root/target/release/safety-layers"

# The system site-packages are visible so that numpy/matplotlib/pandas already installed are
# reused; whatever is missing is installed into the environment only.
python3 -m venv --system-site-packages "$tmp/venv"
py="$tmp/venv/bin/python"
# maturin is a binary: one on PATH, else a fresh one in the environment.
maturin="$(command -v maturin || true)"
if [ -z "$maturin" ]; then
  "$py" -m pip install -q --ignore-installed "maturin>=1.7,<2"
  maturin="$tmp/venv/bin/maturin"
fi
"$py" -c "import numpy, pytest, matplotlib, pandas, tqdm" 2>/dev/null \
  || "$py" -m pip install -q numpy pytest matplotlib pandas tqdm

"$maturin" build --release --manifest-path "$here/Cargo.toml" -i "$py" -o "$tmp/wheels"
"$py" -m pip install -q --force-reinstall --no-deps "$tmp"/wheels/safety_layers-*.whl

# Run from the tests directory, so that the installed wheel is imported, not the source tree.
(cd "$here/tests" && "$py" -m pytest -q -p no:cacheprovider)
MPLBACKEND=Agg "$py" "$root/examples/notebook.py" --out "$tmp/notebook"
test -s "$tmp/notebook/cosine.png"
echo "python package: wheel built, tests and notebook example passed"
