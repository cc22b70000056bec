#!/usr/bin/env bash
# Builds hmsa-lab with the `cuda` feature on a machine without a GPU or a
# CUDA toolkit, from NVIDIA's PyPI wheels (CUDA 13.0, Hopper sm_90 by
# default), into target/cuda/release/hmsa-lab.
#
#   tools/cuda-build.sh            # CUDA_COMPUTE_CAP=90 (H100/H200)
#   CUDA_COMPUTE_CAP=80 tools/cuda-build.sh
#
# With a CUDA toolkit installed (nvcc on PATH) plain
# `cargo build --release --features cuda` does the same.
#
# What it sets up (in $HMSA_CUDA_DIR, default ~/.cache/hmsa-cuda):
# - nvcc, cicc, headers and CCCL from the nvidia-cuda-* wheels, laid out as
#   nvcc.profile expects (targets/x86_64-linux -> .): candle-kernels
#   compiles its kernels with them;
# - libcudart, libcublas(Lt), libcurand, libnvrtc from the wheels, with
#   the unversioned names the linker looks for (candle links cudarc with
#   `dynamic-linking`);
# - a stub libcuda.so.1 (the driver library): every cu* entry point of
#   cudarc's driver bindings as an empty function, only for the link. At
#   run time the GPU machine's driver provides the real one.
#
# Running it elsewhere: the binary needs the driver (libcuda.so.1) and the
# CUDA 13 libraries, e.g. from PyTorch's wheels:
#   LD_LIBRARY_PATH=<site-packages>/nvidia/cu13/lib hmsa-lab bench --precision bf16
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${HMSA_CUDA_DIR:-$HOME/.cache/hmsa-cuda}
ROOT=$DIR/tree/nvidia/cu13
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}

if [ ! -x "$ROOT/bin/nvcc" ]; then
  mkdir -p "$DIR/wheels"
  for spec in "nvidia-cuda-nvcc>=13.0,<13.1" "nvidia-cuda-runtime>=13.0,<13.1" \
              "nvidia-cuda-crt>=13.0,<13.1" "nvidia-nvvm>=13.0,<13.1" \
              "nvidia-cuda-cccl>=13.0,<13.1" "nvidia-cuda-nvrtc>=13.0,<13.1" \
              "nvidia-cublas>=13.0,<13.1" "nvidia-curand==10.4.0.35"; do
    python3 -m pip download -q --no-deps --only-binary=:all: \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
      -d "$DIR/wheels" "$spec"
  done
  mkdir -p "$DIR/tree"
  for w in "$DIR"/wheels/*.whl; do
    python3 -c "import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])" "$w" "$DIR/tree"
  done
  chmod +x "$ROOT"/bin/* "$ROOT"/nvvm/bin/*
fi

mkdir -p "$ROOT/targets" "$ROOT/lib/stubs"
ln -sfn .. "$ROOT/targets/x86_64-linux"
for l in cudart cublas cublasLt nvrtc; do ln -sf "lib$l.so.13" "$ROOT/lib/lib$l.so"; done
ln -sf libcurand.so.10 "$ROOT/lib/libcurand.so"

# the driver stub, from the bindings of the cudarc in Cargo.lock
cargo fetch --locked -q
CUDARC=$(cargo metadata --format-version 1 --locked --features cuda 2>/dev/null | python3 -c '
import json, sys
m = json.load(sys.stdin)
print(next(p["manifest_path"] for p in m["packages"] if p["name"] == "cudarc").rsplit("/", 1)[0])')
grep -oh '^pub unsafe fn cu[A-Za-z0-9_]*' "$CUDARC/src/driver/sys/mod.rs" | sed 's/pub unsafe fn //' | sort -u \
  | awk '{print "void " $1 "(void) {}"}' > "$DIR/cuda-stub.c"
gcc -shared -fPIC -Wl,-soname,libcuda.so.1 "$DIR/cuda-stub.c" -o "$ROOT/lib/stubs/libcuda.so"
ln -sf stubs/libcuda.so "$ROOT/lib/libcuda.so"

export CUDA_HOME=$ROOT PATH=$ROOT/bin:$PATH LIBRARY_PATH=$ROOT/lib
cargo build --release --locked --features cuda --bin hmsa-lab --target-dir target/cuda
echo "built target/cuda/release/hmsa-lab (sm_$CUDA_COMPUTE_CAP)"
