"""Checks of a model folder before loading it: each problem is one line saying what is wrong and the fix."""

from __future__ import annotations

import copy
import functools
import importlib
import importlib.util
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlx.core as mx

from mlx_abliteration.errors import UserError
from mlx_abliteration.runtime.mx_types import flat_params

if TYPE_CHECKING:
    import mlx.nn as nn

INDEX_NAME = "model.safetensors.index.json"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "vocab.json",
    "tokenizer.tiktoken",
    "qwen.tiktoken",
    "vocab.txt",
)


def parse_config(path: Path) -> dict:
    """``path/config.json`` as a dict with a string ``model_type`` (a copy: callers may change it).

    Parsed once per version of the file (its path, size and modification time), however many steps of
    a run ask for it."""
    file = Path(path) / "config.json"
    try:
        stat = file.stat()
    except OSError as err:
        raise UserError(
            f"cannot read {file} ({err.strerror or err}); fix its permissions (chmod a+r) or copy the model somewhere readable"
        ) from None
    return copy.deepcopy(_parsed_config(str(file.resolve()), stat.st_size, stat.st_mtime_ns))


@functools.lru_cache(maxsize=16)
def _parsed_config(file_name: str, size: int, mtime_ns: int) -> dict:
    file = Path(file_name)
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as err:
        raise UserError(
            f"cannot read {file} ({err.strerror or err}); fix its permissions (chmod a+r) or copy the model somewhere readable"
        ) from None
    except UnicodeDecodeError:
        raise UserError(f"{file} is not UTF-8 text; restore the model's original config.json") from None
    try:
        config = json.loads(text)
    except json.JSONDecodeError as err:
        raise UserError(f"{file} is not valid JSON ({err}); restore the file") from None
    if not isinstance(config, dict):
        raise UserError(
            f"{file} holds a JSON {type(config).__name__}, not an object; restore the model's original config.json"
        )
    model_type = config.get("model_type")
    if not isinstance(model_type, str) or not model_type:
        raise UserError(
            f'{file} has no "model_type"; restore the original config.json or add the architecture, '
            'e.g. "model_type": "llama" (or "qwen2", "mistral", ...)'
        )
    return config


def check_model_type(path: Path, config: dict) -> None:
    """The installed mlx-lm must implement ``model_type``."""

    try:
        import mlx_lm
        from mlx_lm.utils import MODEL_REMAPPING
    except ImportError:
        return
    model_type = config["model_type"]
    module = MODEL_REMAPPING.get(model_type, model_type)
    try:
        found = importlib.util.find_spec(f"mlx_lm.models.{module}") is not None
        found = found and bool(model_classes(config))  # a module of mlx_lm.models that is a model (not rope_utils)
    except (ImportError, ValueError):
        found = False
    if not found:
        version = getattr(mlx_lm, "__version__", "?")
        raise UserError(
            f"{path}/config.json has model_type {model_type!r}, which mlx-lm {version} does not support; "
            "upgrade mlx-lm (pip install -U mlx-lm) or use a model of a supported architecture"
        )


def model_classes(config: dict) -> tuple[type, Any]:
    """mlx-lm's ``(Model, ModelArgs)`` classes for a config, picked as ``mlx_lm.utils.load_model`` picks them
    (``model_type``, remapped by ``architectures`` or the type aliases). mlx-lm has no public name for this."""

    from mlx_lm import utils

    model_type = config["model_type"]
    architectures = config.get("architectures") or ()
    if isinstance(architectures, str):
        architectures = (architectures,)
    by_architecture = getattr(utils, "MODEL_ARCHITECTURE_REMAPPING", {})
    remapped = next(
        (by_architecture[(model_type, a)] for a in architectures if (model_type, a) in by_architecture), None
    )
    module = remapped or utils.MODEL_REMAPPING.get(model_type, model_type)
    try:
        arch = importlib.import_module(f"mlx_lm.models.{module}")
    except ImportError as err:
        raise ValueError(f"Model type {module} not supported.") from err
    model, args = getattr(arch, "Model", None), getattr(arch, "ModelArgs", None)
    if not isinstance(model, type) or not callable(getattr(args, "from_dict", None)):
        raise ValueError(f"Model type {module} not supported: mlx_lm.models.{module} is not a model")
    return model, args


def check_index(path: Path) -> None:
    """Every shard named in ``model.safetensors.index.json`` must exist."""
    index_path = Path(path) / INDEX_NAME
    if not index_path.is_file():
        return
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"{index_path} is unreadable ({err}); restore the file") from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict):
        raise UserError(f'{index_path} has no "weight_map" object; restore the file')
    shards = sorted({str(s) for s in weight_map.values()})
    missing = [s for s in shards if not (Path(path) / s).is_file()]
    if missing:
        tensors = sum(1 for s in weight_map.values() if s in missing)
        raise UserError(
            f"{path} is missing weight shard(s) {', '.join(missing)} ({tensors} tensors) listed in {INDEX_NAME}; "
            "download the missing file(s) again"
        )


def check_tokenizer_files(path: Path) -> None:
    path = Path(path)
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise UserError(
            f"{path} has no tokenizer (none of {', '.join(TOKENIZER_FILES[:2])}, ...); copy the tokenizer files "
            "(tokenizer.json, tokenizer_config.json, special_tokens_map.json) from the original model"
        )


def tokenizer_error(path: Path, err: Exception) -> UserError:
    """A one-line error for a tokenizer that failed to load."""
    path = Path(path)
    try:
        tok_config = json.loads((path / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        tok_config = {}
    detail = " ".join(str(err).split())[:200] or type(err).__name__
    if isinstance(tok_config, dict) and tok_config.get("auto_map"):
        return UserError(
            f"the tokenizer in {path} needs custom Python code (auto_map in tokenizer_config.json), which this tool "
            "does not run; use a model with a standard tokenizer.json, or convert it with mlx_lm.convert"
        )
    return UserError(
        f"cannot load the tokenizer in {path} ({detail}); copy tokenizer.json and tokenizer_config.json from the original model"
    )


def check_model_folder(path: Path) -> dict:
    """All checks that need no weights loaded; returns the config."""
    config = parse_config(path)
    check_model_type(path, config)
    check_index(path)
    check_tokenizer_files(path)
    return config


def check_finite_weights(model: nn.Module, path: Path) -> None:
    """Name the first parameter holding NaN/inf (a corrupt source), before any probing blames the data."""

    for name, value in flat_params(model.parameters()):
        if not mx.issubdtype(value.dtype, mx.floating):
            continue
        if not mx.all(mx.isfinite(value)).item():
            raise UserError(
                f"weight {name} in {path} contains NaN or inf values: the model files are corrupt "
                "(not a problem of the datasets); download or convert the model again"
            )
