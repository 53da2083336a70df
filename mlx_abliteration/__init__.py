"""MLX Abliteration Toolkit: remove refusal behaviour from chat LLMs on MLX."""

from mlx_abliteration.runtime.backend import full_float32_matmul, preload_blas
from mlx_abliteration.runtime.hub_env import sanitize_hub_timeouts

__version__ = "0.1.0"

# Must run before anything imports mlx.core: MLX's Linux CPU wheel ships a
# reference BLAS that is ~27x slower than OpenBLAS for float32 matmul.
preload_blas()
# Also before any computation: float32 matmuls at full precision on GPUs (not TF32).
full_float32_matmul()
# Before anything imports huggingface_hub (mlx-lm, transformers do): it dies on a timeout it cannot parse.
sanitize_hub_timeouts()
