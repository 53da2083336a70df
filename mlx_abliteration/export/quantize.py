"""Quantized output (``--quantize {4,8,mxfp4}``): the abliterated model, quantized like ``mlx_lm.convert -q``.

The edit is always made in full precision first. The dense abliterated model
is written (streaming, as without ``--quantize``) into a scratch folder next
to the output, then loaded lazily and quantized with mlx-lm's own
``quantize_model`` (same predicate, same defaults, same config entries as
``mlx_lm.convert -q``), saved, and the folder renamed into place. So the
result is exactly what ``mlx_lm.convert -q`` makes of the dense abliterated
model.

A quantized source: its edited matrices are computed from the dequantized
weights and kept unquantized (bfloat16) in the scratch copy; every other
quantized matrix is dequantized (``mlx_lm.utils.dequantize_model``) and the
whole model is requantized with the requested settings. The edit is thus not
first rounded to the source's grid and then again to the output's.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import mlx.core as mx

from mlx_abliteration.export.save import save_ablated_model, validate_output_dir, write_records
from mlx_abliteration.io.atomic_write import is_user_write_failure, write_error
from mlx_abliteration.io.model_io import check_model_dir, read_config, side_files, weight_files
from mlx_abliteration.io.output_dir import make_temp_dir, replace_dir
from mlx_abliteration.runtime.utils import sha256_file

if TYPE_CHECKING:
    from mlx_abliteration.edit.orthogonalize import AblationPlan
    from mlx_abliteration.probe.capture import Progress


def quantize_dir(dense: Path, out: Path, spec: dict) -> dict:
    """Quantize the model in ``dense`` into ``out`` (weights, index, config, side files). Returns the new config."""
    from mlx_lm.utils import dequantize_model, load_model, quantize_model, save_config, save_model

    model, config = load_model(dense, lazy=True)
    if config.get("quantization") or config.get("quantization_config"):
        model = dequantize_model(model)
        config = {k: v for k, v in config.items() if k not in ("quantization", "quantization_config")}
    with contextlib.redirect_stdout(io.StringIO()):  # quantize_model prints its bits per weight
        model, config = quantize_model(model, config, spec["group_size"], spec["bits"], mode=spec["mode"])
    out.mkdir(parents=True, exist_ok=True)
    save_model(out, model, donate_model=True)  # the model is not used afterwards
    del model
    mx.clear_cache()
    for item in side_files(dense):
        if item.name != "config.json":
            shutil.copy2(item, out / item.name)
    save_config(config, out / "config.json")
    return config


def save_quantized_model(
    source_dir: str | Path,
    output_dir: str | Path,
    plan: AblationPlan,
    spec: dict,
    *,
    overwrite: bool = False,
    record: dict | None = None,
    directions: tuple[dict, dict] | None = None,
    model_card: str | None = None,
    progress: Progress | None = None,
    extra_files: dict[str, str] | None = None,
) -> dict:
    """``save_ablated_model``, then quantized: same files, same summary, atomically into ``output_dir``."""

    source, output = Path(source_dir), Path(output_dir)
    check_model_dir(source)
    validate_output_dir(source, output, overwrite, fresh=False)
    quantized_source = bool(read_config(source).get("quantization"))
    scratch = make_temp_dir(output)
    try:
        dense, final = scratch / "dense", scratch / "quantized"
        summary = save_ablated_model(
            source,
            dense,
            plan,
            edited_precision="bfloat16" if quantized_source else None,
            progress=progress,
        )
        quantize_dir(dense, final, spec)
        shutil.rmtree(dense)
        index = json.loads((final / "model.safetensors.index.json").read_text())
        summary["total_size"] = index["metadata"]["total_size"]
        summary["output_sha256"] = {p.name: sha256_file(p) for p in weight_files(final)}
        write_records(final, source, summary, record, directions, model_card)
        for name, text in (extra_files or {}).items():
            (final / name).write_text(text)
        replace_dir(final, output, overwrite)
    except (OSError, RuntimeError) as err:
        if isinstance(err, FileNotFoundError) or not is_user_write_failure(err):
            raise
        raise write_error(output, err) from err
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    summary["output_dir"] = str(output)
    return summary
