#!/usr/bin/env bash
# Prepares gpu/ (ignored by git) for tools/gpu_check.sh on a GPU machine: the `cuda` build of the
# binary (stripped, xz-compressed to fit a 64 MiB transfer), SmolLM2's config and tokenizer (the
# weights do not travel: 98 MB), Llama-3's tokenizer, D_o and the Normal records. Run here, on a
# machine with Rust and ../shared; then carry gpu/ and run `tools/gpu_check.sh OUT`.
set -euo pipefail
cd "$(dirname "$0")/.."
shared=${SHARED:-../shared}
mkdir -p gpu/smollm2 gpu/llama3
grep -qx '/gpu/' .git/info/exclude 2>/dev/null || echo '/gpu/' >> .git/info/exclude
cargo fetch
eval "$(tools/cuda_toolchain.sh)"
CARGO_TARGET_DIR=target/cuda cargo build --release --features cuda --bin safety-layers
cp target/cuda/release/safety-layers gpu/safety-layers.tmp
strip gpu/safety-layers.tmp
xz -T0 -6 -f gpu/safety-layers.tmp
mv gpu/safety-layers.tmp.xz gpu/safety-layers.xz
rm -f gpu/safety-layers
# SmolLM2's side files from the GGUF (converting writes the weights too; only the JSON stays).
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
cargo build --release --bin safety-layers
target/release/safety-layers convert --model "$shared/models/SmolLM2-135M-Instruct.Q4_1.gguf" \
    --out "$tmp/smol" --dtype bf16
cp "$tmp"/smol/{config.json,tokenizer.json,tokenizer_config.json,generation_config.json} gpu/smollm2/
cp "$shared"/tokenizers/llama3/tokenizer*.json gpu/llama3/
cp "$shared/data/paper/Over_rejection_dataset.csv" gpu/do.txt
python3 - "$shared/data/paper/Normal_dataset.json" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
json.dump(d[:6], open("gpu/normal6.json", "w"))
json.dump(d[:64], open("gpu/normal64.json", "w"))
PY
du -sh gpu
