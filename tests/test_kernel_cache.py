"""MLX's compiled CUDA kernels are kept under the tool's cache root unless MLX_PTX_CACHE_DIR is set."""

import os

import mlx.core as mx

from mlx_abliteration.runtime.backend import PTX_CACHE_ENV, persistent_kernel_cache


def test_sets_a_per_version_per_architecture_dir_on_cuda(monkeypatch, tmp_path):
    monkeypatch.setenv(PTX_CACHE_ENV, "")  # unset for the function; monkeypatch restores it afterwards
    monkeypatch.setenv("MLX_ABLITERATION_CACHE", str(tmp_path / "root"))
    monkeypatch.setattr(mx.cuda, "is_available", lambda: True)
    monkeypatch.setattr(mx, "device_info", lambda: {"architecture": "sm_90", "device_name": "GPU"})
    path = persistent_kernel_cache()
    assert path == str(tmp_path / "root" / "cuda-kernels" / f"mlx-{mx.__version__}-sm_90")
    assert os.environ[PTX_CACHE_ENV] == path
    monkeypatch.setenv(PTX_CACHE_ENV, "")
    assert persistent_kernel_cache(str(tmp_path / "flag")) == str(
        tmp_path / "flag" / "cuda-kernels" / f"mlx-{mx.__version__}-sm_90"
    )


def test_keeps_the_users_setting(monkeypatch):
    monkeypatch.setenv(PTX_CACHE_ENV, "/somewhere/else")
    monkeypatch.setattr(mx.cuda, "is_available", lambda: True)
    assert persistent_kernel_cache() is None
    assert os.environ[PTX_CACHE_ENV] == "/somewhere/else"


def test_nothing_without_cuda(monkeypatch):
    monkeypatch.setenv(PTX_CACHE_ENV, "")
    monkeypatch.setattr(mx.cuda, "is_available", lambda: False)
    assert persistent_kernel_cache() is None
    assert os.environ[PTX_CACHE_ENV] == ""
