"""OpenBLAS runs the kernels the CPU supports, whatever its model name (backend.choose_openblas_core)."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

from mlx_abliteration.runtime import backend

AVX512 = {"avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl"}


@pytest.mark.parametrize(
    "flags, core",
    [
        (AVX512 | {"avx2", "fma", "avx512_fp16"}, "SKYLAKEX"),  # e.g. Sapphire Rapids without AMX
        ({"avx", "avx2", "fma"}, "HASWELL"),
        ({"avx512f", "avx2", "fma"}, "HASWELL"),  # AVX-512 foundation alone is not enough for SkylakeX's kernels
        ({"sse3", "avx"}, None),
        (set(), None),
    ],
)
def test_the_kernel_family_follows_the_feature_flags(flags, core):
    assert backend.openblas_core_for(flags) == core


def test_flags_are_read_from_cpuinfo(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: Intel(R) Xeon(R) Processor\nflags\t\t: fpu sse3 avx2 fma\n\n")
    assert backend.cpu_flags(str(cpuinfo)) == {"fpu", "sse3", "avx2", "fma"}
    assert backend.cpu_flags(str(tmp_path / "missing")) == set()


def test_the_users_choice_is_kept_and_otherwise_the_flags_decide(monkeypatch):
    monkeypatch.setattr(backend.platform, "machine", lambda: "x86_64")
    monkeypatch.setenv(backend.CORETYPE_ENV, "HASWELL")
    assert backend.choose_openblas_core(AVX512) == "HASWELL"
    monkeypatch.delenv(backend.CORETYPE_ENV)
    assert backend.choose_openblas_core(AVX512) == "SKYLAKEX"
    assert os.environ[backend.CORETYPE_ENV] == "SKYLAKEX"
    monkeypatch.delenv(backend.CORETYPE_ENV)
    assert backend.choose_openblas_core({"sse3"}) is None
    assert backend.CORETYPE_ENV not in os.environ


def test_other_architectures_are_left_to_openblas(monkeypatch):
    monkeypatch.setattr(backend.platform, "machine", lambda: "aarch64")
    monkeypatch.delenv(backend.CORETYPE_ENV, raising=False)
    assert backend.choose_openblas_core(AVX512) is None
    assert backend.CORETYPE_ENV not in os.environ


def test_the_loaded_openblas_runs_the_family_the_flags_allow():
    expected = backend.openblas_core_for(backend.cpu_flags())
    env = {k: v for k, v in os.environ.items() if k not in (backend.CORETYPE_ENV, backend.BLAS_ENV)}
    code = "import mlx_abliteration; from mlx_abliteration.runtime.backend import blas_info; print(blas_info())"
    info = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    if not info.startswith("OpenBLAS") or expected is None or sys.platform != "linux":
        pytest.skip(f"no OpenBLAS loaded or no known kernel family here: {info.strip()}")
    assert f"{expected.lower()} kernels" in info.lower(), info


def test_importing_the_package_loads_openblas_before_mlx():
    """Where OpenBLAS is installed, ``import mlx_abliteration`` loads it before anything imports mlx.core.

    A module-level ``import mlx.core`` in the modules the package's ``__init__`` imports first (the backend)
    loads MLX's reference BLAS first: float32 matmul ~27x slower, and only blas_info() says so."""
    arch = platform.machine()
    installed = [p.format(arch=arch) for p in backend._CANDIDATES if os.path.exists(p.format(arch=arch))]
    if sys.platform != "linux" or not installed:
        pytest.skip("no OpenBLAS installed here")
    env = {k: v for k, v in os.environ.items() if k != backend.BLAS_ENV}
    code = "import mlx_abliteration; from mlx_abliteration.runtime.backend import blas_info; print(blas_info())"
    info = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert info.startswith("OpenBLAS"), info
