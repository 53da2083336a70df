#!/bin/bash
# The head-to-head (bench/versus.py) on the lent NVIDIA machine, which has no network.
# bench/gpu_versus_pack.sh packs its inputs here; each device call carries one piece.
#   bash bench/gpu_versus.sh append .vs-pieces/pNN    # add a piece to /tmp/vs/blob
#   bash bench/gpu_versus.sh setup SHA256              # check, unpack, install, convert Qwen
#   bash bench/gpu_versus.sh start [versus.py args]    # versus.py in the background
#   bash bench/gpu_versus.sh wait SECONDS              # follow its log until done or SECONDS
#   bash bench/gpu_versus.sh collect                   # results and logs into $OUT
# Heretic runs under the machine's own PyTorch (its device map "auto", its own batch-size
# choice); ours under MLX's CUDA backend. Both are installed into /tmp/vs/site.
set -euo pipefail
VS=/tmp/vs
SITE=$VS/site
CACHE=$VS/cache
REPO=$VS/repo

use_site() {
  export PYTHONPATH="$REPO:$SITE" PYTHONUNBUFFERED=1 PATH="$SITE/bin:$PATH"
  export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
  export LD_LIBRARY_PATH="$(ls -d "$SITE"/nvidia/*/lib | tr '\n' ':')${LD_LIBRARY_PATH:-}"
}

case "$1" in
append)
  mkdir -p "$VS" && cat "$2" >> "$VS/blob" && stat -c '%s bytes so far' "$VS/blob" ;;
setup)
  echo "$2  $VS/blob" | sha256sum -c -
  mkdir -p "$VS/files" && tar -xf "$VS/blob" -C "$VS/files" && rm "$VS/blob"
  python3 -m pip install -q --no-index --no-deps --no-compile --target "$SITE" "$VS"/files/*.whl
  # MLX's CUDA libraries look for the NVIDIA runtime beside them: use the one PyTorch ships.
  NV=$(python3 -c "import nvidia; print(list(nvidia.__path__)[0])")
  ln -sfn "$NV" "$SITE/nvidia"
  INC="$NV/cu13/include"  # MLX's JIT kernels include <crt/mma.h>: borrow it from the toolkit
  if [ -d "$INC" ] && [ ! -e "$INC/crt" ] && [ -d /usr/local/cuda/include/crt ]; then ln -s /usr/local/cuda/include/crt "$INC/crt" || true; fi
  mkdir -p "$CACHE/gguf" && mv "$VS"/files/*.gguf "$CACHE/gguf/"
  rm -rf "$REPO" && mkdir -p "$REPO" && cp -r mlx_abliteration tests bench pyproject.toml "$REPO/"
  use_site
  python3 -c "import mlx.core as mx; print('mlx', mx.__version__, mx.default_device(), 'cuda', mx.cuda.is_available())"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  (cd "$REPO" && python3 -m tests.support.real_models --cache-dir "$CACHE" qwen)
  heretic --help | head -3 ;;
start)
  shift
  use_site
  rm -rf "$REPO/bench" && cp -r bench "$REPO/"  # the newest script, if it changed since setup
  cd "$REPO" && rm -f "$VS/done"  # a run's end marker; `wait` follows the newest run
  ARGS=(--cache-dir "$CACHE" --work-dir "$VS/work" --results "$VS/versus.json"
    --heretic "$SITE/bin/heretic" --mlx-abliterate "$SITE/bin/mlx-abliterate"
    --heretic-device-map auto --heretic-batch-size 0 --heretic-timeout 1200 "$@")
  # one step a process, in turn: a tool that fails leaves the other's run and the eval of what was saved
  setsid nohup bash -c 'for s in split heretic ours eval report; do python3 bench/versus.py --steps $s "$@"; done; touch /tmp/vs/done' \
    versus "${ARGS[@]}" > "$VS/run.log" 2>&1 < /dev/null &
  echo "started $!" ;;
wait)
  end=$((SECONDS + $2))
  while [ $SECONDS -lt $end ] && [ ! -e "$VS/done" ]; do sleep 5; done
  tail -n 25 "$VS/run.log"
  nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader
  [ -e "$VS/done" ] && echo DONE || echo RUNNING ;;
collect)
  cp "$VS/run.log" "$OUT/" || true
  cp "$VS"/versus*.json "$OUT/" 2>/dev/null || true
  for w in "$VS"/work*; do
    (cd "$w" && tar -czf "$OUT/$(basename "$w").tgz" --exclude=model --exclude=studies --exclude=checkpoints .) || true
  done
  ls -la "$OUT" ;;
*)
  echo "usage: $0 append PIECE | setup SHA256 | start [ARGS] | wait SECONDS | collect" >&2; exit 2 ;;
esac
