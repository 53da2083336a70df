"""MLX Abliteration Toolkit: remove refusal behaviour from chat LLMs on MLX."""

from mlx_abliteration.runtime.backend import full_float32_matmul, preload_blas

__version__ = "0.1.0"

# Must run before anything imports mlx.core: MLX's Linux CPU wheel ships a
# reference BLAS that is ~27x slower than OpenBLAS for float32 matmul.
preload_blas()
# Also before any computation: float32 matmuls at full precision on GPUs (not TF32).
full_float32_matmul()
