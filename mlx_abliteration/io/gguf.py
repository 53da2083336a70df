"""GGUF file -> MLX model directory (safetensors weights, config.json, tokenizer files).

Q4_0 / Q4_1 / Q8_0 tensors become MLX affine-quantized weights (group 32) losslessly:
their blocks are exactly ``scale * q + bias`` with unsigned ``q``. Every other type is
dequantized with the ``gguf`` package (``mx.load`` decodes some K-quants wrongly) to
float16/bfloat16. Tensors stream row chunk by row chunk from the memory-mapped GGUF
into safetensors files, so peak memory stays near one chunk, not the model.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from mlx_abliteration.errors import UserError
from mlx_abliteration.io.atomic_write import is_user_write_failure, write_error
from mlx_abliteration.io.gguf_config import build_config
from mlx_abliteration.io.gguf_reader import (
    architecture_of,
    open_gguf,
)
from mlx_abliteration.io.gguf_tensors import plan_tensors, write_weights
from mlx_abliteration.io.gguf_tokenizer import eos_token_ids, pre_tokenizer_style, write_tokenizer_files
from mlx_abliteration.io.output_dir import OutputChanged, check_output_dir, make_temp_dir, replace_dir
from mlx_abliteration.runtime.utils import cache_root, sha256_file

if TYPE_CHECKING:
    pass

IMPORTER_VERSION = 1
MARKER_FILE = "gguf_import.json"
DTYPES = ("bfloat16", "float16")


# --------------------------------------------------------------------------- reading


# --------------------------------------------------------------------------- tensors


# --------------------------------------------------------------------------- writing


# --------------------------------------------------------------------------- config


# --------------------------------------------------------------------------- conversion


def convert_gguf(
    gguf_path: Path,
    output_dir: Path,
    dtype: str = "bfloat16",
    overwrite: bool = False,
    expected_sha256: str | None = None,
) -> Path:
    """Convert a GGUF file into an MLX model dir; atomic: nothing is left behind on error.

    ``expected_sha256``, when given, must match the file's hash (checked before writing).
    """
    return _convert(Path(gguf_path), Path(output_dir), dtype, overwrite, expected_sha256, None)


def _convert(
    gguf_path: Path,
    output_dir: Path,
    dtype: str,
    overwrite: bool,
    expected_sha256: str | None,
    known_sha256: str | None,
) -> Path:
    if dtype not in DTYPES:
        raise UserError(f"unsupported --dtype {dtype!r}; choose one of: {', '.join(DTYPES)}")
    # The output may not be, contain or lie in the file the user named (DIR/m.gguf -o DIR --overwrite
    # deleted it); what is there now is remembered so the final rename never replaces a newer output.
    check_output_dir(output_dir, sources=[gguf_path], overwrite=overwrite)
    reader = open_gguf(gguf_path)
    _, arch = architecture_of(reader, gguf_path)
    tensors = plan_tensors(reader, gguf_path, arch, dtype)
    pre_tokenizer_style(reader, gguf_path)  # unsupported tokenizers fail before any writing
    if not any(t.name == "model.embed_tokens.weight" for t in tensors):
        raise UserError(f"{gguf_path.name} has no token_embd.weight tensor; the GGUF is incomplete")
    sha256 = known_sha256 or sha256_file(gguf_path)
    if expected_sha256 and sha256 != expected_sha256:
        raise UserError(f"sha256 of {gguf_path} is {sha256}, expected {expected_sha256}; download the file again")
    eos_ids = eos_token_ids(reader)
    config = build_config(reader, arch, tensors, dtype, eos_ids)

    try:
        temp_dir = make_temp_dir(output_dir)  # also sweeps temp dirs of killed conversions
    except OSError as err:
        if not is_user_write_failure(err):
            raise
        raise write_error(output_dir, err) from err
    try:
        write_weights(temp_dir, tensors)
        (temp_dir / "config.json").write_text(json.dumps(config, indent=2))
        write_tokenizer_files(reader, temp_dir, gguf_path, config["max_position_embeddings"], eos_ids)
        marker = {"source": gguf_path.name, "sha256": sha256, "dtype": dtype, "importer_version": IMPORTER_VERSION}
        (temp_dir / MARKER_FILE).write_text(json.dumps(marker, indent=2))
        replace_dir(temp_dir, output_dir, overwrite)
    except (OSError, RuntimeError) as err:  # full disk, read-only folder: one line, nothing left
        shutil.rmtree(temp_dir, ignore_errors=True)
        if not is_user_write_failure(err):
            raise  # out of memory, a bug: keep its type and traceback
        raise write_error(output_dir, err) from err
    except BaseException:
        shutil.rmtree(temp_dir, ignore_errors=True)
        raise
    return output_dir


def conversion_is_current(model_dir: Path, sha256: str, dtype: str) -> bool:
    """True when ``model_dir`` holds a complete conversion of that file with this importer."""
    try:
        marker = json.loads((Path(model_dir) / MARKER_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return (
        marker.get("sha256") == sha256
        and marker.get("dtype") == dtype
        and marker.get("importer_version") == IMPORTER_VERSION
        and (Path(model_dir) / "config.json").is_file()
    )


def convert_gguf_cached(gguf_path: Path, cache_dir: Path | None = None, dtype: str = "bfloat16") -> Path:
    """Convert once per (file content, dtype) into ``<cache>/converted/<sha256[:16]>-<dtype>``."""
    gguf_path = Path(gguf_path)
    open_gguf(gguf_path)  # clear errors before hashing a possibly large non-GGUF file
    sha256 = sha256_file(gguf_path)
    root = cache_root(cache_dir)
    target = root / "converted" / f"{sha256[:16]}-{dtype}"
    if conversion_is_current(target, sha256, dtype):
        return target
    print(f"converting {gguf_path.name} into {target} (once; cached by file hash)", file=sys.stderr)
    try:
        return _convert(gguf_path, target, dtype, True, None, sha256)
    except OutputChanged:
        if conversion_is_current(target, sha256, dtype):
            return target  # a concurrent conversion of the same file finished first
        raise
