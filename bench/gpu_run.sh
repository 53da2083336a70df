#!/bin/bash
# On the NVIDIA machine (no network): install MLX's CUDA backend from the
# carried wheel parts, then run bench/gpu_probe_ablate.py.
#   bash bench/gpu_run.sh STAGE_DIR [benchmark args...]
#   SETUP_ONLY=1 bash bench/gpu_run.sh STAGE_DIR   # install only; then
#   export PYTHONPATH=/tmp/mlx-site:$PWD LD_LIBRARY_PATH=$(ls -d /tmp/mlx-site/nvidia/*/lib | tr '\n' :)
# STAGE_DIR holds mlx-*.whl, mlx_lm-*.whl and mlxcuda.tar.xz.part-* (the
# mlx-cuda-13 wheel's files as tar.xz, split to fit the 64 MiB transfers),
# and optionally gguf-*.whl (for the GGUF tests).
set -euo pipefail
STAGE=$1; shift
SITE=/tmp/mlx-site
if [ ! -d "$SITE/mlx/lib" ]; then
  cat "$STAGE"/mlxcuda.tar.xz.part-* > /tmp/mlxcuda.tar.xz
  python3 -m pip install -q --no-index --no-deps --no-compile --target "$SITE" "$STAGE"/mlx-0.32.*.whl "$STAGE"/mlx_lm-*.whl $(ls "$STAGE"/gguf-*.whl 2>/dev/null || true)
  tar -xJf /tmp/mlxcuda.tar.xz -C "$SITE"
  # libmlx.so finds CUDA libraries at $ORIGIN/../../nvidia/*: point that at torch's.
  NV=$(python3 -c "import nvidia; print(list(nvidia.__path__)[0])")
  ln -sfn "$NV" "$SITE/nvidia"
  # MLX's JIT-compiled kernels (quantized matmul on sm90) include <crt/mma.h>,
  # which torch's nvidia/cu13/include lacks: borrow it from the CUDA toolkit.
  INC="$NV/cu13/include"
  if [ -d "$INC" ] && [ ! -e "$INC/crt" ] && [ -d /usr/local/cuda/include/crt ]; then ln -s /usr/local/cuda/include/crt "$INC/crt" || true; fi
fi
export PYTHONPATH="$SITE:$PWD" PYTHONUNBUFFERED=1
export LD_LIBRARY_PATH="$(ls -d "$SITE"/nvidia/*/lib | tr '\n' ':')${LD_LIBRARY_PATH:-}"
python3 -c "import mlx.core as mx; print('mlx', mx.__version__, mx.default_device(), 'cuda', mx.cuda.is_available())"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
[ -n "${SETUP_ONLY:-}" ] && exit 0
python3 bench/gpu_probe_ablate.py "$@"
