"""MLX Abliteration Toolkit: remove refusal behaviour from chat LLMs on MLX."""

from .backend import preload_blas

__version__ = "0.1.0"

# Must run before anything imports mlx.core: MLX's Linux CPU wheel ships a
# reference BLAS that is ~27x slower than OpenBLAS for float32 matmul.
preload_blas()
