"""All model I/O: loading for compute, and the streaming shard-by-shard save."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from ..errors import UserError

log = logging.getLogger(__name__)


def check_model_dir(path: str | Path) -> Path:
    """Validate that ``path`` looks like an MLX/HF model directory."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"model path {path} does not exist; pass a local model directory, a .gguf file or a hub id")
    if not path.is_dir():
        raise UserError(f"model path {path} is not a directory; pass a model directory or a .gguf file")
    if not (path / "config.json").is_file():
        raise UserError(f"{path} has no config.json; point --model at a directory holding config.json and *.safetensors")
    if not weight_files(path):
        raise UserError(f"{path} has no model*.safetensors weights; convert the model to safetensors (mlx_lm.convert) first")
    return path


def weight_files(path: Path) -> list[Path]:
    return sorted(Path(path).glob("model*.safetensors"))


def read_config(path: str | Path) -> dict:
    try:
        return json.loads((Path(path) / "config.json").read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"{path}/config.json is not valid JSON ({err}); restore the file") from None


def load_model(path: str | Path, compute_dtype="auto", lazy: bool = False):
    """Load ``(model, tokenizer, config)`` from a local model dir for computation.

    ``compute_dtype="auto"`` runs in float32 on the CPU backend (much faster
    there with OpenBLAS) and keeps the stored dtype on GPUs. The saved model
    always keeps the source dtype: saving reads tensors from the source files.
    """
    import mlx.core as mx
    from mlx_lm.utils import load_model as _load_model
    from mlx_lm.utils import load_tokenizer

    from .._backend import compute_dtype as default_compute_dtype

    path = check_model_dir(path)
    try:
        model, config = _load_model(path, lazy=True)
    except ValueError as err:
        raise UserError(f"cannot load model from {path}: {err}") from None
    except RuntimeError as err:  # safetensors header/truncation errors surface here
        raise UserError(f"cannot read weights in {path}: {err}; the file may be truncated or corrupt") from None
    dtype = default_compute_dtype() if compute_dtype == "auto" else compute_dtype
    if dtype is not None:
        model.set_dtype(dtype)
    if not lazy:
        try:
            mx.eval(model.parameters())
        except RuntimeError as err:
            raise UserError(f"cannot read weights in {path}: {err}; the file may be truncated or corrupt") from None
    tokenizer = load_tokenizer(path, eos_token_ids=config.get("eos_token_id"))
    return model, tokenizer, config
