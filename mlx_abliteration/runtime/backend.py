"""Compute backend setup: optimized BLAS on Linux CPU and the compute dtype.

Kept free of MLX imports so it can run before ``mlx.core`` is loaded.
"""

from __future__ import annotations

import ctypes
import os
import platform
import sys
from typing import Any

from mlx_abliteration.runtime.utils import cache_root

BLAS_ENV = "MLX_ABLITERATION_BLAS"
_CANDIDATES = (
    "/usr/lib/{arch}-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/{arch}-linux-gnu/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
)

_state: dict[str, str | None] = {"blas": None, "note": None}

CORETYPE_ENV = "OPENBLAS_CORETYPE"
# Feature sets of OpenBLAS's x86-64 kernel families, best first (what their
# float32 GEMM kernels need).
_X86_CORES = (
    ("SKYLAKEX", {"avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl"}),
    ("HASWELL", {"avx2", "fma"}),
)


def cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> set[str]:
    """The CPU's feature flags as Linux reports them (empty if unknown)."""
    try:
        with open(cpuinfo) as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.partition(":")[2].split())
    except OSError:
        pass
    return set()


def openblas_core_for(flags: set[str]) -> str | None:
    """The best OpenBLAS x86-64 kernel family a CPU with ``flags`` runs, or None."""
    return next((core for core, needed in _X86_CORES if needed <= flags), None)


def choose_openblas_core(flags: set[str] | None = None) -> str | None:
    """Set ``OPENBLAS_CORETYPE`` from the CPU's flags unless the user set it; return the value in effect.

    OpenBLAS picks its kernels by CPU model, and a model it does not know
    gets its generic kernels: Debian 12's OpenBLAS 0.3.21 runs a Sapphire
    Rapids Xeon in a VM (no AMX exposed) as "Prescott", SSE3 only, and
    float32 GEMM ran at 40 GFLOP/s instead of 265 with SkylakeX's kernels on
    2 cores (6.6x; a Qwen2.5-1.5B forward pass 13 vs ~36 tokens/s). The
    feature flags say what the CPU can run whatever its model name.
    """
    if os.environ.get(CORETYPE_ENV):
        return os.environ[CORETYPE_ENV]
    if platform.machine() not in ("x86_64", "AMD64"):
        return None
    core = openblas_core_for(cpu_flags() if flags is None else flags)
    if core:
        os.environ[CORETYPE_ENV] = core
    return core


def preload_blas() -> str | None:
    """Load OpenBLAS globally so MLX's CPU backend resolves BLAS symbols to it.

    ``MLX_ABLITERATION_BLAS=off`` disables it; a path selects a library.
    Returns the loaded path, or None.
    """
    if _state["blas"] is not None or sys.platform != "linux":
        return _state["blas"]
    choice = os.environ.get(BLAS_ENV, "")
    if choice.lower() in ("off", "0", "none", "reference"):
        _state["note"] = f"disabled by {BLAS_ENV}"
        return None
    if "mlx.core" in sys.modules:
        _state["note"] = "mlx.core was imported before mlx_abliteration; BLAS not replaced"
        return None
    choose_openblas_core()  # read by OpenBLAS when it loads, so before the CDLL call
    arch = platform.machine()
    candidates = [choice] if choice else [c.format(arch=arch) for c in _CANDIDATES]
    for path in candidates:
        if os.path.exists(path):
            try:
                ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
            except OSError as err:
                _state["note"] = f"could not load {path}: {err}"
                continue
            _state["blas"] = path
            return path
    if _state["note"] is None:
        _state["note"] = "OpenBLAS not found (apt-get install libopenblas0-pthread); using MLX's bundled BLAS"
    return None


TF32_ENV = "MLX_ENABLE_TF32"


def full_float32_matmul() -> None:
    """Keep float32 matmuls in full float32 on GPUs (MLX_ENABLE_TF32=0 unless the user set it).

    MLX runs float32 matmul-family ops at TF32 precision by default on CUDA
    (and on M5-class Metal): a ~3e-4 relative error per product, against
    ~1e-7 in float32. The writer proof (``core.writers``) measures a layer's
    remaining update along r in float32 and refuses an architecture above
    1e-3 of it; at TF32 a supported model (gpt2, falcon_h1 as float32 models)
    was refused with "still writes 8% of a direction", and float32 probes
    differed between batch sizes by 1e-3 relative. Models in bf16/fp16 never
    take this path, so it costs nothing there. MLX reads the variable once, at
    the first matmul: this runs at import, before anything is computed.
    """
    os.environ.setdefault(TF32_ENV, "0")


PTX_CACHE_ENV = "MLX_PTX_CACHE_DIR"


def persistent_kernel_cache(cache_dir: str | None = None) -> str | None:
    """Keep MLX's compiled CUDA kernels across reboots; returns the directory set, or None.

    MLX's CUDA backend compiles some kernels at first use (NVRTC, ~3 s each
    on an H200) and caches them in ``MLX_PTX_CACHE_DIR``, by default
    ``/tmp/mlx/<version>/ptx``, which a reboot or a fresh machine wipes: the
    first ``run`` of an 8B model there took 53-60 s against 24-26 s with the
    kernels cached. Unless the user set the variable, it points at
    ``cuda-kernels/mlx-<version>-<sm_XY>`` under the tool's cache root
    (``--cache-dir``, else ``$MLX_ABLITERATION_CACHE``, else
    ``~/.cache/mlx-abliteration``): the MLX version and the GPU architecture
    are in the name, since cached kernels are binaries for one architecture
    (a home directory shared by machines with different GPUs keeps one set per
    kind). MLX reads the variable once, when it compiles its first kernel, so
    this runs before any computation (the CLI calls it at start). Nothing is
    set without a CUDA GPU.
    """
    if os.environ.get(PTX_CACHE_ENV):
        return None
    import mlx.core as mx  # noqa: PLC0415  (this module runs before mlx.core may load: preload_blas)

    cuda = getattr(mx, "cuda", None)
    if cuda is None or not cuda.is_available():
        return None
    try:
        arch = str(mx.device_info().get("architecture") or "")
    except Exception:  # an MLX without device_info: leave MLX's default
        return None
    version = str(getattr(mx, "__version__", ""))
    if not arch or not version:
        return None

    path = str(cache_root(cache_dir) / "cuda-kernels" / f"mlx-{version}-{arch}")
    os.environ[PTX_CACHE_ENV] = path
    return path


TORCH_ENV = "MLX_ABLITERATION_TORCH"
_TORCH_PACKAGES = ("torch", "torchvision", "torchaudio")


def keep_torch_out() -> bool:
    """Keep transformers from importing PyTorch into this process; True if done.

    Nothing here runs PyTorch, but transformers imports it (and torchvision)
    whenever it is installed, e.g. when a tokenizer's config class loads:
    10 s of a 40 s ``run`` on an H200 host with CUDA torch. A ``None`` entry in
    ``sys.modules`` is Python's documented way to make an import fail, and
    ``importlib.util.find_spec`` then reports the package as absent, so
    transformers treats it as not installed. Only the CLI calls this (it owns
    its process); ``MLX_ABLITERATION_TORCH=1`` keeps PyTorch importable.
    """

    if os.environ.get(TORCH_ENV, "") not in ("", "0") or any(name in sys.modules for name in _TORCH_PACKAGES):
        return False
    for name in _TORCH_PACKAGES:
        sys.modules[name] = None  # type: ignore[assignment]  # the documented import blocker
    return True


def blas_info() -> str:
    """A human-readable line saying which BLAS the CPU backend uses."""
    if _state["blas"]:
        return f"OpenBLAS ({_state['blas']}, {openblas_kernels(_state['blas'])} kernels)"
    if sys.platform == "darwin":
        return "Accelerate (macOS)"
    return f"MLX bundled BLAS ({_state['note'] or 'not replaced'})"


def openblas_kernels(path: str) -> str:
    """The kernel family the loaded OpenBLAS runs (``openblas_get_corename``), or "unknown"."""
    try:
        corename = ctypes.CDLL(path).openblas_get_corename
    except (OSError, AttributeError):
        return "unknown"
    corename.restype = ctypes.c_char_p
    return (corename() or b"unknown").decode()


def compute_dtype() -> Any:
    """dtype to run models in: float32 on the CPU backend, None (keep) elsewhere.

    bf16/fp16 matmul on MLX's CPU backend is ~16x slower than float32 with an
    optimized BLAS; on Metal/CUDA half precision is the fast path.
    """

    import mlx.core as mx  # noqa: PLC0415  (this module runs before mlx.core may load: preload_blas)

    if mx.default_device() == mx.cpu:
        return mx.float32
    return None
