#!/bin/bash
# Here (with network to the package index): pack everything the head-to-head needs on
# the lent NVIDIA machine, which has none, into pieces small enough for one device call
# each (a call carries <= 64 MiB with the working tree): the wheels of
# bench/requirements-versus-gpu.txt for Python 3.12, our own wheel, and the Qwen GGUF.
#   bash bench/gpu_versus_pack.sh [CACHE_DIR]    # -> .vs-pieces/p00, p01, ... and SHA256
# Then on the device, one call per piece: `bash bench/gpu_versus.sh append .vs-pieces/pNN`,
# and `bash bench/gpu_versus.sh setup $(cat .vs-pieces/SHA256)`.
set -euo pipefail
CACHE=${1:-$HOME/.cache/mlx-abliteration}
OUT=.vs-pieces
STAGE=$(mktemp -d)
trap 'rm -rf "$STAGE"' EXIT
grep -qx '/.vs-pieces/' .git/info/exclude 2>/dev/null || echo '/.vs-pieces/' >> .git/info/exclude
PLATFORMS="--python-version 3.12 --implementation cp --only-binary=:all: --platform any"
for n in 1 2014 _2_17 _2_24 _2_27 _2_28 _2_34 _2_35; do PLATFORMS+=" --platform manylinux${n}_x86_64"; done
grep -v '^#' bench/requirements-versus-gpu.txt | while read -r req; do
  [ -n "$req" ] || continue
  # a few are published as source only (pure Python): build their wheels here
  python3 -m pip download -q --no-deps $PLATFORMS -d "$STAGE" "$req" 2>/dev/null \
    || python3 -m pip wheel -q --no-deps -w "$STAGE" "$req"
done
python3 -m pip wheel -q --no-deps -w "$STAGE" .
python3 -m tests.support.real_models --cache-dir "$CACHE" qwen >/dev/null
cp "$CACHE"/gguf/Qwen2.5-Coder-1.5B-Instruct-Q4_K_M.gguf "$STAGE"/
rm -rf "$OUT" && mkdir -p "$OUT"
tar -C "$STAGE" -cf - . | split -b 60M -d -a 2 - "$OUT/p"
cat "$OUT"/p* | sha256sum | cut -d' ' -f1 > "$OUT/SHA256"
ls -l "$OUT"
