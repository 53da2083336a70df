"""All model I/O: checking a model folder, loading it for compute, and reading its shards."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import mlx.core as mx
from safetensors import SafetensorError, safe_open

from mlx_abliteration.errors import UserError
from mlx_abliteration.io.model_checks import (
    check_finite_weights,
    check_index,
    check_model_type,
    check_tokenizer_files,
    parse_config,
    tokenizer_error,
)
from mlx_abliteration.runtime.backend import compute_dtype as default_compute_dtype
from mlx_abliteration.runtime.cpu_activations import fast_swiglu_wanted, use_fast_swiglu
from mlx_abliteration.runtime.dense_twins import dequantize_for_compute, should_dequantize
from mlx_abliteration.runtime.lookup_tables import input_only_tables, keep_compact
from mlx_abliteration.runtime.mx_types import load_with_metadata
from mlx_abliteration.runtime.quantization import QuantParams

if TYPE_CHECKING:
    import mlx.core as mx
    import mlx.nn as nn

    from mlx_abliteration.runtime.quantization import QuantParams

log = logging.getLogger(__name__)


def check_model_dir(path: str | Path) -> Path:
    """Validate that ``path`` looks like an MLX/HF model directory."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"model path {path} does not exist; pass a local model directory, a .gguf file or a hub id")
    if not path.is_dir():
        raise UserError(f"model path {path} is not a directory; pass a model directory or a .gguf file")
    if not (path / "config.json").is_file():
        raise UserError(
            f"{path} has no config.json; point --model at a directory holding config.json and *.safetensors"
        )
    if not weight_files(path):
        raise UserError(
            f"{path} has no model*.safetensors weights; convert the model to safetensors (mlx_lm.convert) first"
        )

    parse_config(path)
    check_index(path)
    return path


def weight_files(path: Path) -> list[Path]:
    return sorted(Path(path).glob("model*.safetensors"))


def read_config(path: str | Path) -> dict:
    return parse_config(Path(path))


def load_model(
    path: str | Path,
    compute_dtype: mx.Dtype | Literal["auto"] | None = "auto",
    lazy: bool = False,
    dequantize: bool | Literal["auto"] = "auto",
    check_tokenizer: Callable[[Any, dict], None] | None = None,
) -> tuple[nn.Module, Any, dict[str, Any]]:
    """Load ``(model, tokenizer, config)`` from a local model dir for computation.

    ``compute_dtype="auto"`` runs in float32 on the CPU backend (much faster
    there with OpenBLAS) and keeps the stored dtype on GPUs. On the CPU,
    quantized layers are also made dense when that fits in memory
    (``dequantize="auto"``; see ``engine.dense_twins``). The saved model always
    keeps the source dtype and quantization: saving reads the source files.
    ``check_tokenizer(tokenizer, config)`` runs before the weights are read (e.g. the chat template's check).
    """
    from mlx_lm.utils import load_model as _load_model

    path = check_model_dir(path)
    check_model_type(path, read_config(path))
    check_tokenizer_files(path)
    try:
        # Reading files is host work: on CUDA a load on the GPU stream ran at
        # 2.4 GB/s, on the CPU stream at 10 GB/s (plus 2 s to move 16 GB on
        # first use); on Metal and the CPU backend memory is shared anyway.
        with mx.stream(mx.cpu):
            model, config = _load_model(path, lazy=True)
    except ValueError as err:  # mlx-lm: missing/extra parameters, unsupported model type
        raise UserError(f"cannot load model from {path}: {err}") from err
    except RuntimeError as err:
        if not is_unreadable_weights(err):
            raise
        raise UserError(f"cannot read weights in {path}: {err}; the file may be truncated or corrupt") from err
    # The weights are only mapped so far (lazy): the tokenizer is loaded and checked before they are read.
    tokenizer = load_tokenizer(path, config)
    if check_tokenizer is not None:
        check_tokenizer(tokenizer, config)
    if fast_swiglu_wanted():
        use_fast_swiglu()  # the model's module is imported now; its MLP gate runs vectorized
    dtype = default_compute_dtype() if compute_dtype == "auto" else compute_dtype
    try:
        if not lazy and dtype is not None and dequantize in (True, "auto"):
            # Before set_dtype: twins dequantize with the stored scales, exactly
            # as the save path does.
            if dequantize is True or should_dequantize(model, dtype):
                dequantize_for_compute(model, dtype)
        if dtype is not None:
            # A table only looked up stays in its stored half precision (half the memory, same values).
            stored = [(module, module.weight) for _, module in input_only_tables(model)] if not lazy else []
            model.set_dtype(dtype)
            keep_compact(stored, dtype)
        if not lazy:
            mx.eval(model.parameters())
            mx.clear_cache()  # the stored-dtype copies just freed would otherwise stay cached
    except RuntimeError as err:  # lazy loading: a truncated file surfaces at the first eval; OOM is not the user's file
        if not is_unreadable_weights(err):
            raise
        raise UserError(f"cannot read weights in {path}: {err}; the file may be truncated or corrupt") from err
    if not lazy:
        check_finite_weights(model, path)
    return model, tokenizer, config


def load_tokenizer(path: str | Path, config: dict | None = None) -> Any:
    """mlx-lm's tokenizer of a model dir (``config``: its loaded config, for the end-of-sequence ids); a
    tokenizer that does not load is one line (``tokenizer_error``)."""
    from mlx_lm.utils import load_tokenizer as _load_tokenizer

    path = Path(path)
    eos = (config if config is not None else read_config(path)).get("eos_token_id")
    try:
        # Never remote code, and never transformers' "run the custom code? [y/N]" prompt on the terminal.
        return _load_tokenizer(path, tokenizer_config_extra={"trust_remote_code": False}, eos_token_ids=eos)
    except Exception as err:  # transformers raises many kinds (OSError, ValueError, ImportError...)
        raise tokenizer_error(path, err) from None


# MLX's exact messages for a safetensors file that cannot be read (missing,
# truncated, bad header). Any other RuntimeError (out of memory, a bug) is not
# the file's fault and keeps its type and traceback.
_UNREADABLE = re.compile(
    r"^\[(?:load_safetensors|load)\] (?:Failed to open|Invalid json header|The JSON header|Invalid json metadata|"
    r"Tensor '.*' invalid data offsets|Invalid header)|^\[read\] Unable to read"
)


def is_unreadable_weights(err: BaseException) -> bool:
    """True for MLX's errors about an unreadable or truncated weight file."""
    return isinstance(err, RuntimeError) and bool(_UNREADABLE.match(str(err).strip()))


# --- streaming, atomic save ---------------------------------------------------

INDEX_NAME = "model.safetensors.index.json"


def quant_params_for(module_path: str, config: dict) -> QuantParams | None:
    """Quantization of ``module_path`` from config.json (per-layer entries win)."""

    q = config.get("quantization") or config.get("quantization_config")
    if not isinstance(q, dict) or "bits" not in q:
        return None
    entry = q.get(module_path, True)
    if entry is False:
        return None
    if isinstance(entry, dict):
        # The entry's group_size/mode win over the top-level ones (a dict merge: dict.get with
        # an Any default is typed Optional by typeshed).
        merged = {"group_size": q["group_size"], "mode": q.get("mode", "affine"), **entry}
        return QuantParams(merged["group_size"], entry["bits"], merged["mode"])
    return QuantParams(q["group_size"], q["bits"], q.get("mode", "affine"))


def shard_layout(source: Path) -> tuple[list[str], dict[str, str], dict]:
    """Shard file names, tensor -> shard map, and the source index metadata."""
    index_path = source / INDEX_NAME
    if index_path.exists():
        try:
            index = json.loads(index_path.read_text())
        except json.JSONDecodeError as err:
            raise UserError(f"{index_path} is not valid JSON ({err}); restore the file") from None
        weight_map = index.get("weight_map", {})
        shards = sorted(set(weight_map.values()))
        missing = [s for s in shards if not (source / s).is_file()]
        if missing:
            raise UserError(f"{source} is missing weight shard(s) {', '.join(missing)} listed in {INDEX_NAME}")
        return shards, weight_map, index.get("metadata", {})
    shards = [p.name for p in weight_files(source)]
    weight_map = {}
    for shard in shards:
        for name in safetensors_names(source / shard):
            weight_map[name] = shard
    return shards, weight_map, {}


def safetensors_names(path: Path) -> list[str]:
    """Tensor names from a safetensors header, validated by the ``safetensors`` library
    (bad header, or a file shorter than its header says: truncated)."""

    try:
        with safe_open(str(path), framework="numpy") as f:
            return list(f.keys())
    except (SafetensorError, OSError) as err:
        raise UserError(
            f"{path} is not a valid safetensors file ({err}); it may be truncated or corrupt: re-download it"
        ) from err


def tensor_bytes(path: Path) -> int:
    """Bytes of tensor data in a safetensors file (``safe_open`` checked that the data covers the file exactly)."""
    safetensors_names(path)
    with open(path, "rb") as f:
        header_size = int.from_bytes(f.read(8), "little")
    return path.stat().st_size - 8 - header_size


def load_shard(path: Path) -> tuple[dict[str, mx.array], dict[str, str]]:
    safetensors_names(path)
    try:
        return load_with_metadata(str(path))  # host I/O: see load_model
    except RuntimeError as err:
        if not is_unreadable_weights(err):
            raise
        raise UserError(f"cannot read {path} ({err}); it may be truncated or corrupt: re-download it") from err


# Side files a saved model needs besides its weights (what mlx-lm and its
# tokenizers read, plus licences); nothing else of the source is copied, so
# no original weights in other formats (consolidated.safetensors, original/)
# ever ship with the edited model.
SIDE_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "spiece.model",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
    "*.tiktoken",
    "tokenization_*.py",
    "LICENSE*",
    "NOTICE*",
)


def side_files(source: Path) -> list[Path]:
    """The files of ``source`` a saved copy keeps besides the weights (``SIDE_FILES``)."""
    return sorted({p for pattern in SIDE_FILES for p in Path(source).glob(pattern) if p.is_file()})
