#!/usr/bin/env bash
# Installs the CUDA 13.0 build toolchain from PyPI wheels into DIR (default ~/.cache/safety-layers/cuda)
# and prints the environment for `cargo build --release --features cuda` on a machine without a
# GPU or a system CUDA toolkit:
#
#   eval "$(tools/cuda_toolchain.sh)"            # nvcc, headers and the libraries to link
#   eval "$(tools/cuda_toolchain.sh --check)"    # nvcc and headers only (enough for cargo check)
#   cargo build --release --features cuda --bin safety-layers
#
# 13.0 matches the driver of the GPU machines this is run on (PTX from a newer toolkit does not load on
# an older driver). The driver library itself (libcuda.so.1) comes with the GPU's driver; for
# linking here a stub exporting the driver API's names is generated from cudarc's bindings.
set -euo pipefail
check_only=0
[ "${1:-}" = "--check" ] && { check_only=1; shift; }
dir=${1:-${XDG_CACHE_HOME:-$HOME/.cache}/safety-layers/cuda}
mkdir -p "$dir/whl" "$dir/root" "$dir/stubs"
pkgs="nvidia-cuda-nvcc==13.0.88 nvidia-cuda-crt==13.0.88 nvidia-nvvm==13.0.88 nvidia-cuda-cccl==13.0.85 nvidia-cuda-runtime==13.0.96"
[ $check_only = 0 ] && pkgs="$pkgs nvidia-cuda-nvrtc==13.0.88 nvidia-cublas==13.10.0.20 nvidia-curand==10.4.5.25"
for p in $pkgs; do
    name=${p%%==*}; ver=${p##*==}
    stamp="$dir/root/.${name}-${ver}"
    [ -f "$stamp" ] && continue
    python3 -m pip download -q --no-deps -d "$dir/whl" "$p" >&2
    whl=$(ls "$dir/whl/$(echo "$name" | tr - _)-${ver}-"*.whl | head -1)
    python3 -c "import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])" "$whl" "$dir/root"
    touch "$stamp"
done
cuda="$dir/root/nvidia/cu13"
chmod +x "$cuda/bin/"* "$cuda/nvvm/bin/"* 2>/dev/null || true
if [ $check_only = 0 ]; then
    # The linker wants unversioned names; the binary records the versioned sonames.
    for f in cudart nvrtc curand cublas cublasLt; do
        so=$(cd "$cuda/lib" && ls "lib$f.so."* | grep -v alt | head -1)
        ln -sf "$so" "$cuda/lib/lib$f.so"
    done
    if [ ! -f "$dir/stubs/libcuda.so" ]; then
        src=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-0.19.*/src/driver/sys/mod.rs 2>/dev/null | head -1)
        if [ -z "$src" ]; then
            echo "error: cudarc's sources are not in the cargo registry; run \`cargo fetch\` first" >&2
            exit 1
        fi
        grep -ohP '^pub unsafe fn \Kcu\w+(?=\()' "$src" | sort -u | awk '{print "void "$1"(void){}"}' > "$dir/stubs/cuda_stub.c"
        cc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$dir/stubs/libcuda.so" "$dir/stubs/cuda_stub.c"
    fi
fi
echo "export CUDA_HOME='$cuda'"
echo "export PATH='$cuda/bin':\"\$PATH\""
echo "export CUDA_COMPUTE_CAP=\${CUDA_COMPUTE_CAP:-90}"
echo "export LIBRARY_PATH='$cuda/lib:$dir/stubs'\${LIBRARY_PATH:+:\$LIBRARY_PATH}"
