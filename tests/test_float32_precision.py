"""float32 matmuls run at full float32 precision on every backend (MLX's CUDA default is TF32)."""

from __future__ import annotations

import os
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest

from .cli_helpers import REPO


@pytest.mark.parametrize("preset,expected", [(None, "0"), ("1", "1"), ("0", "0")])
def test_import_turns_tf32_off_unless_the_user_chose(preset, expected):
    env = {k: v for k, v in os.environ.items() if k != "MLX_ENABLE_TF32"}
    if preset is not None:
        env["MLX_ENABLE_TF32"] = preset
    code = "import os, mlx_abliteration; print(os.environ['MLX_ENABLE_TF32'])"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == expected


@pytest.mark.skipif(os.environ.get("MLX_ENABLE_TF32") not in (None, "0"), reason="TF32 chosen by the user")
def test_float32_matmul_is_full_precision_on_the_default_device():
    # A matrix-matrix product (cuBLAS on CUDA, TF32 there by default: ~3e-4
    # relative error) and a matrix-vector one (MLX's own kernel, always fp32).
    a = mx.random.normal((64, 96), key=mx.random.key(0))
    b = mx.random.normal((96, 80), key=mx.random.key(1))
    ref = np.array(a, dtype=np.float64) @ np.array(b, dtype=np.float64)
    for rows in (64, 1):
        out = np.array(a[:rows] @ b)
        err = np.linalg.norm(out - ref[:rows]) / np.linalg.norm(ref[:rows])
        assert err < 1e-5, (mx.default_device(), rows, err)
