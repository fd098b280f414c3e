#!/usr/bin/env bash
# Runs the engine's kernel tests for aarch64 under qemu-user, so the NEON paths execute (not only
# compile, as .ci/run's clippy check does) on an x86_64 machine. About 8 minutes of building on
# 2 cores, too long for CI's budget; run it after changing a NEON kernel.
#
#   tools/test_aarch64.sh            # the kernels:: tests
#   tools/test_aarch64.sh dequant    # a filter of your own
#
# Needs Debian's qemu-user, gcc-aarch64-linux-gnu and libc6-dev-arm64-cross (installed with apt
# when missing and running as root) and the rustup target aarch64-unknown-linux-gnu.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v qemu-aarch64 >/dev/null || ! command -v aarch64-linux-gnu-gcc >/dev/null; then
    if [[ $(id -u) == 0 ]]; then
        apt-get install -y -q qemu-user gcc-aarch64-linux-gnu libc6-dev-arm64-cross >/dev/null
    else
        echo "tools/test_aarch64.sh: install qemu-user gcc-aarch64-linux-gnu libc6-dev-arm64-cross" >&2
        exit 1
    fi
fi
rustup target add aarch64-unknown-linux-gnu >/dev/null
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER="qemu-aarch64 -L /usr/aarch64-linux-gnu"
exec cargo test --release -p sl-engine --lib --target aarch64-unknown-linux-gnu -- "${1:-kernels::}"
