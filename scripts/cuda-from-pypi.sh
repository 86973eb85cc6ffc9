#!/usr/bin/env bash
# Builds `vae --features cuda` on a machine without a CUDA toolkit (or without a GPU), from
# NVIDIA's packages on PyPI: nvcc, the headers, and the libraries the binary links.
#
#   scripts/cuda-from-pypi.sh [DIR] [COMPUTE_CAP]     (default /opt/cuda-pypi, 90 = H100/H200)
#
# CUDA 13.0 to match the driver (580) of the GPU machines this was written for: candle's kernels
# are PTX that the driver compiles at start, and a driver refuses PTX from a newer nvcc (for
# another driver, change the pins below to its CUDA version). The binary lands in
# target/cuda/release/vae; it needs libcuda.so.1 (the driver) and, unless the machine has a
# CUDA toolkit, LD_LIBRARY_PATH pointing at DIR/nvidia/cu13/lib (or at the same libraries from
# another pip install, e.g. PyTorch's).
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${1:-/opt/cuda-pypi}
CAP=${2:-90}
PY=${PYTHON:-python3}
"$PY" -m pip install -q --no-deps --target "$DIR" \
  nvidia-cuda-nvcc==13.0.88 nvidia-cuda-runtime==13.0.96 nvidia-cuda-crt==13.0.88 \
  nvidia-nvvm==13.0.88 nvidia-cuda-cccl==13.0.85 nvidia-cuda-nvrtc==13.0.88 \
  nvidia-cublas==13.1.2.11 nvidia-curand==10.4.0.35
ROOT=$DIR/nvidia/cu13
# The linker wants unversioned names; the wheels ship only the versioned ones.
for l in cublas cublasLt cudart nvrtc; do ln -sf "lib$l.so.13" "$ROOT/lib/lib$l.so"; done
ln -sf libcurand.so.10 "$ROOT/lib/libcurand.so"
# libcuda is the driver's and is on no package index: link against a stub that exports the
# driver API's names (from cudarc's bindings) under the driver's soname, as the toolkit's own
# stubs/libcuda.so does. At run time the real driver is loaded in its place.
cargo fetch --locked -q
SYS=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-*/src/driver/sys/mod.rs | tail -1)
mkdir -p "$ROOT/lib/stubs"
grep -oE '^pub unsafe fn cu[A-Za-z0-9_]+' "$SYS" | awk '{print "int " $4 "(void) { return 999; }"}' \
  | sort -u > "$ROOT/lib/stubs/libcuda.c"
cc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$ROOT/lib/stubs/libcuda.so" "$ROOT/lib/stubs/libcuda.c"
ln -sf stubs/libcuda.so "$ROOT/lib/libcuda.so"
export CUDA_ROOT=$ROOT CUDA_COMPUTE_CAP=$CAP PATH=$ROOT/bin:$PATH
cargo build --release --locked --features cuda --target-dir target/cuda
echo "built target/cuda/release/vae (CUDA 13.0, sm_$CAP); run it with"
echo "  LD_LIBRARY_PATH=$ROOT/lib target/cuda/release/vae train --device cuda"
