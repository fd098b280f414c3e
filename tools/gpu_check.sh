#!/usr/bin/env bash
# Issue 15's GPU check: runs tools/gpu_check.py on a machine with an NVIDIA GPU, the driver, torch
# and transformers, and no Rust toolchain. Bring along gpu/, which tools/gpu_prepare.sh fills:
#   gpu/safety-layers.xz     the binary built with `--features cuda`
#   gpu/smollm2/ gpu/llama3/ tokenizer and config files; gpu/do.txt (D_o, one prompt per line);
#   gpu/normal6.json gpu/normal64.json (training records)
# Usage: tools/gpu_check.sh OUT_DIR [--parts a,c]
# Writes OUT_DIR/gpu_check.md (the table), OUT_DIR/gpu_check.json and OUT_DIR/log.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: tools/gpu_check.sh OUT_DIR [--parts a,c]}
shift
mkdir -p "$out"
bin=gpu/safety-layers
if [ ! -x "$bin" ] && [ -f "$bin.xz" ]; then
    python3 -c "import lzma,shutil,sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2],'wb'))" "$bin.xz" /tmp/safety-layers
    chmod +x /tmp/safety-layers
    bin=/tmp/safety-layers
fi
# The CUDA 13 libraries the binary links (cuBLAS, cuRAND, NVRTC, the runtime) from torch's wheels.
libs=$(python3 - <<'PY'
import glob, os, site
dirs = set()
for root in site.getsitepackages() + [site.getusersitepackages()]:
    for name in ["libcublas.so.*", "libcurand.so.*", "libnvrtc.so.*", "libcudart.so.*"]:
        for f in glob.glob(os.path.join(root, "nvidia", "**", name), recursive=True):
            dirs.add(os.path.dirname(f))
print(":".join(sorted(dirs)))
PY
)
export LD_LIBRARY_PATH="$libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
{
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
    ldd "$bin" | grep -E "cuda|cublas|curand|nvrtc|not found" || true
    "$bin" --version
} 2>&1 | tee "$out/log.txt"
PYTHONUNBUFFERED=1 python3 tools/gpu_check.py --bin "$bin" --out "$out" --assets gpu "$@" 2>&1 | tee -a "$out/log.txt"
