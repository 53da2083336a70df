"""The streaming save: read a source shard, edit its writers, write it under the same name; one atomic publish at the end."""

from __future__ import annotations

import json
import os
import shutil
import threading
from collections.abc import Iterable
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import mlx.core as mx

from mlx_abliteration.edit.orthogonalize import check_edits, edit_module, touches
from mlx_abliteration.errors import UserError
from mlx_abliteration.export.source_layout import discover_writers_in_dir, open_layout
from mlx_abliteration.io.atomic_write import is_user_write_failure, write_error
from mlx_abliteration.io.model_io import (
    INDEX_NAME,
    check_model_dir,
    quant_params_for,
    read_config,
    safetensors_names,
    side_files,
    tensor_bytes,
    weight_files,
)
from mlx_abliteration.io.output_dir import check_output_dir, make_temp_dir, replace_dir
from mlx_abliteration.io.safetensors_out import (
    array_entry,
    dtype_name,
    read_header,
    source_entry,
    start_file_writeback,
    write_shard,
)
from mlx_abliteration.runtime.utils import sha256_file

if TYPE_CHECKING:
    from concurrent.futures import Future

    import mlx.core as mx

    from mlx_abliteration.edit.orthogonalize import AblationPlan, EditReport, ModuleEdit
    from mlx_abliteration.io.safetensors_out import SourceTensor
    from mlx_abliteration.probe.capture import Progress
    from mlx_abliteration.runtime.quantization import QuantParams


def validate_output_dir(source: Path, output: Path, overwrite: bool, fresh: bool = True) -> None:
    """Refuse outputs that would touch the source or clobber other files (see ``output_dir``)."""

    check_output_dir(output, sources=[source], overwrite=overwrite, fresh=fresh)


def _module_groups(weight_map: dict[str, str]) -> dict[str, dict[str, str]]:
    """module path -> {leaf name: shard}."""
    groups: dict[str, dict[str, str]] = {}
    for name, shard in weight_map.items():
        module, _, leaf = name.rpartition(".")
        groups.setdefault(module, {})[leaf] = shard
    return groups


def save_ablated_model(
    source_dir: str | Path,
    output_dir: str | Path,
    plan: AblationPlan,
    *,
    overwrite: bool = False,
    edited_precision: str | None = None,
    record: dict | None = None,
    directions: tuple[dict, dict] | None = None,
    model_card: str | None = None,
    progress: Progress | None = None,
    extra_files: dict[str, str] | None = None,
) -> dict:
    """Write the ablated model shard by shard into ``output_dir``, atomically.

    Each source shard's residual writers are edited (in float32, cast back to
    their dtype, requantized with their own parameters) and the shard is
    written under the same name with the same metadata by
    ``safetensors_out.write_shard`` on a background thread: unedited tensors
    are copied from the source file's bytes, edited ones written from memory,
    the SHA256 taken as the bytes are written, the disk told to start writing
    at once. The next shards are edited meanwhile; the edits held in memory
    stay within about two shards (``_ShardWriter``). Everything goes to a
    temporary sibling directory renamed at the end; on any error or interrupt
    the writes are stopped, it is removed and the source is never touched.
    Returns a summary with the edit reports and SHA256 digests.
    """
    source, output = Path(source_dir), Path(output_dir)
    check_model_dir(source)
    validate_output_dir(source, output, overwrite, fresh=False)
    try:
        tmp = make_temp_dir(output)
    except OSError as err:
        if not is_user_write_failure(err):
            raise
        raise UserError(f"cannot create {output} ({err.strerror or err}); choose a writable --output-dir") from err
    try:
        with _Hasher() as hasher:
            hasher.add("source", weight_files(source))
            summary = _write_model(source, tmp, plan, edited_precision, progress, hasher)
            summary.update(hasher.results())
        write_records(tmp, source, summary, record, directions, model_card)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
        replace_dir(tmp, output, overwrite)
    except (OSError, RuntimeError) as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(err, FileNotFoundError) or not is_user_write_failure(err):
            raise  # not a disk/permission problem (an MLX out-of-memory, a bug): keep its type and traceback
        raise write_error(output, err) from err
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    summary["output_dir"] = str(output)
    return summary


class _Hasher:
    """SHA256 of the source files on background threads, overlapping with the shard edits,
    and the output digests: each written shard's from its writer (hashed as written), a
    shard copied byte for byte its source's.

    hashlib releases the GIL, so several files hash at once (a 16 GB model is
    32 GB of hashing, source and output: ~20 s on one core).
    """

    def __enter__(self) -> _Hasher:
        self.pool = ThreadPoolExecutor(max_workers=max(1, min(8, os.cpu_count() or 1)))
        self.jobs: dict[str, dict[str, Future[str]]] = {"source": {}, "output": {}}
        return self

    def add(self, kind: str, paths: Iterable[Path]) -> None:
        for path in paths:
            self.jobs[kind][path.name] = self.pool.submit(sha256_file, path)

    def add_written(self, path: Path, digest: Future[str]) -> None:
        """``path`` is being written by a job that returns the SHA256 of the bytes it wrote."""
        self.jobs["output"][path.name] = digest

    def add_copy(self, path: Path) -> None:
        """``path`` is a byte copy of the source file of the same name."""
        source_job = self.jobs["source"].get(path.name)
        self.jobs["output"][path.name] = source_job or self.pool.submit(sha256_file, path)

    def results(self) -> dict[str, dict[str, str]]:
        return {
            f"{kind}_sha256": {name: job.result() for name, job in sorted(jobs.items())}
            for kind, jobs in self.jobs.items()
        }

    def __exit__(self, *exc: object) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


class _ShardWriter:
    """Shards written on background threads (``safetensors_out.write_shard``) while the
    next shard is read and edited.

    At most ``max_jobs`` shards are written at once: each is hashed as it is
    written, and SHA256 runs at ~1.4 GB/s on one core, below the disk's rate,
    so shards are hashed in parallel. Only edited tensors are held in memory
    (unedited bytes are copied from the source file), and before the next shard
    is edited the writes in flight hold at most ``budget`` bytes of them, so edits
    in flight plus the shard being edited stay within about two shards.
    The arrays are released on the calling thread once their write is done.
    On an error or interrupt, ``__exit__`` stops the writes (between chunks) and
    waits for them, so nothing writes into the folder after the caller removes it.
    """

    def __init__(self, budget: int, max_jobs: int = 3) -> None:
        self.budget, self.max_jobs = budget, max_jobs

    def __enter__(self) -> _ShardWriter:
        self.pool = ThreadPoolExecutor(max_workers=self.max_jobs, thread_name_prefix="shard-writer")
        self.cancel = threading.Event()
        self.running: list[tuple[Future[str], int, list]] = []  # (job, bytes held, arrays held)
        return self

    def make_room(self) -> None:
        """Wait until another shard may be edited; raise the first failed write."""

        while True:
            self._collect()
            held = sum(n for _, n, _ in self.running)
            if len(self.running) < self.max_jobs and held <= self.budget:
                return
            wait([job for job, _, _ in self.running], return_when=FIRST_COMPLETED)

    def submit(self, path: Path, entries: list, metadata: dict[str, str] | None, arrays: list) -> Future[str]:
        held = sum(e.nbytes for e in entries if e.data is not None)
        job = self.pool.submit(lambda: write_shard(path, entries, metadata, self.cancel))
        self.running.append((job, held, arrays))
        return job

    def _collect(self) -> None:
        for item in [r for r in self.running if r[0].done()]:
            self.running.remove(item)
            item[0].result()  # a failed write raises here

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if exc_type is not None:
            self.cancel.set()
        self.pool.shutdown(wait=True, cancel_futures=exc_type is not None)
        if exc_type is None:
            while self.running:
                self._collect()
        self.running.clear()


def _write_model(
    source: Path,
    out: Path,
    plan: AblationPlan,
    edited_precision: str | None,
    progress: Progress | None,
    hasher: _Hasher,
) -> dict:
    edit_module = _edit_in_blocks  # bounded memory for embeddings and expert stacks

    if plan.writers is None:
        plan = plan.with_writers(discover_writers_in_dir(source))
    layout = open_layout(source, read_config(source))
    config, shards, weight_map = layout.config, layout.shards, layout.weight_map
    groups = _module_groups(weight_map)
    pending: dict[str, mx.array | None] = {}  # edited leaves not yet written (None: dropped)
    new_map, reports, dequantized, total = {}, [], [], 0
    largest = max((tensor_bytes(source / s) for s in shards), default=0) if layout.copyable else 0
    with _ShardWriter(budget=largest) as writer:
        for n, shard in enumerate(shards):
            names = [k for k, v in weight_map.items() if v == shard]
            if (
                layout.copyable
                and not any(touches(plan, k.rpartition(".")[0]) for k in names)
                and not any(k in pending for k in names)
            ):
                # Nothing to edit: a byte-for-byte copy is exact and disk-speed.
                shutil.copyfile(source / shard, out / shard)
                start_file_writeback(out / shard)
                hasher.add_copy(out / shard)
                safetensors_names(source / shard)
                new_map.update({k: shard for k in names})
                total += tensor_bytes(out / shard)
                if progress:
                    progress(n + 1, len(shards), "save")
                continue
            writer.make_room()
            tensors, metadata = layout.load(shard)
            written: dict[str, mx.array] = {}
            unedited: set[str] = set()  # written as loaded: their bytes are the source file's
            for name in list(tensors):
                if name in pending:
                    value = pending.pop(name)
                    if value is not None:
                        written[name] = value
                    continue
                module, _, leaf = name.rpartition(".")
                edit = None
                if leaf in ("weight", "scales", "biases", "bias") and touches(plan, module):
                    leaves = {
                        other: tensors[f"{module}.{other}"]
                        if f"{module}.{other}" in tensors
                        else layout.tensor(f"{module}.{other}")
                        for other in groups[module]
                    }
                    quant = quant_params_for(module, config) if "scales" in leaves else None
                    edit = edit_module(module, leaves, plan, quant, None, edited_precision)
                    del leaves
                if edit is None:
                    written[name] = tensors[name]
                    unedited.add(name)
                    continue
                reports.append(edit.report)
                if edit.dequantized:
                    dequantized.append(module)
                for other_leaf in groups[module]:
                    pending[f"{module}.{other_leaf}"] = edit.tensors.get(other_leaf)
                    tensors.pop(f"{module}.{other_leaf}", None)  # free the source once edited
                value = pending.pop(name)
                if value is not None:
                    written[name] = value
            del tensors
            # Unedited tensors are copied from their byte range of the source shard (never
            # loaded); edited ones are written from memory, in the source file's order.
            stored = read_header(source / shard) if layout.copyable else {}
            copied = {
                name: stored[name] for name in unedited if name in stored and _same_tensor(written[name], stored[name])
            }
            arrays = [value for name, value in written.items() if name not in copied]
            mx.eval(arrays)
            entries = [
                source_entry(name, source / shard, copied[name]) if name in copied else array_entry(name, value)
                for name, value in written.items()
            ]
            entries.sort(key=lambda e: (stored[e.name].offset if e.name in stored else float("inf"), e.name))
            hasher.add_written(out / shard, writer.submit(out / shard, entries, metadata, arrays))
            for entry in entries:
                new_map[entry.name] = shard
                total += entry.nbytes
            del written, arrays, entries
            mx.clear_cache()
            if progress:
                progress(n + 1, len(shards), "save")
    check_edits(plan, reports)
    if layout.write_index:
        index = {
            "metadata": {**layout.index_metadata, "total_size": total},
            "weight_map": dict(sorted(new_map.items())),
        }
        (out / INDEX_NAME).write_text(json.dumps(index, indent=2))
    _copy_side_files(source, out)
    if dequantized or not layout.copyable:
        _write_config(out, config, dequantized)
    return {"reports": reports, "dequantized": dequantized, "total_size": total, "shards": shards}


def _same_tensor(array: mx.array, stored: SourceTensor) -> bool:
    """Whether ``array`` (as loaded) is exactly the stored tensor, so its bytes can be copied."""

    try:
        name = dtype_name(array.dtype)
    except ValueError:
        return False
    return name == stored.dtype and tuple(array.shape) == stored.shape and array.nbytes == stored.nbytes


# Embeddings and expert stacks are edited in blocks of rows (their rows are
# independent), so the float32 temporaries stay far below one shard.
_BLOCK_ELEMENTS = 1 << 23


def _edit_in_blocks(
    module: str,
    leaves: dict[str, mx.array],
    plan: AblationPlan,
    quant: QuantParams | None,
    dense_dtype: mx.Dtype | None,
    edited_precision: str | None,
) -> ModuleEdit | None:
    writer = plan.writer(module)
    if writer is None:  # not a writer this plan edits (edit_module's None)
        return None
    weight = leaves["weight"]
    blockwise = writer.rows or weight.ndim == 3
    if not blockwise or weight.size <= _BLOCK_ELEMENTS or weight.shape[0] < 2:
        return edit_module(module, leaves, plan, quant, dense_dtype, edited_precision)
    rows = max(1, weight.shape[0] * _BLOCK_ELEMENTS // weight.size)
    edits = []
    for start in range(0, weight.shape[0], rows):
        block = {k: v[start : start + rows] if v.ndim == weight.ndim else v for k, v in leaves.items()}
        edit = edit_module(module, block, plan, quant, dense_dtype, edited_precision)
        if edit is None:
            return None
        mx.eval(list(edit.tensors.values()))
        edits.append(edit)
    tensors = {k: mx.concatenate([e.tensors[k] for e in edits]) for k in edits[0].tensors}
    before = sum(e.report.before**2 for e in edits) ** 0.5  # Frobenius norms add in squares
    after = sum(e.report.after**2 for e in edits) ** 0.5
    return replace(edits[0], tensors=tensors, report=replace(edits[0].report, before=before, after=after))


def _copy_side_files(source: Path, out: Path) -> None:
    for item in side_files(source):
        shutil.copy2(item, out / item.name)


def _write_config(out: Path, config: dict, dequantized: list[str]) -> None:
    """config.json, with per-layer ``false`` quantization entries so mlx_lm.load keeps dequantized matrices dense."""
    config = json.loads(json.dumps(config))
    for key in ("quantization", "quantization_config"):
        if isinstance(config.get(key), dict):
            for module in dequantized:
                config[key][module] = False
    (out / "config.json").write_text(json.dumps(config, indent=4))


def write_records(
    out: Path,
    source: Path,
    summary: dict,
    record: dict | None,
    directions: tuple[dict[str, mx.array], dict[str, str]] | None,
    model_card: str | None,
) -> None:
    if directions:
        tensors, metadata = directions
        mx.save_safetensors(str(out / "refusal_direction.safetensors"), tensors, metadata=metadata)
    if "output_sha256" not in summary:  # save_ablated_model hashes while writing
        summary["source_sha256"] = {p.name: sha256_file(p) for p in weight_files(source)}
        summary["output_sha256"] = {p.name: sha256_file(p) for p in weight_files(out)}
    if record is not None:
        record = dict(record)
        record["weights"] = {
            "source_sha256": summary["source_sha256"],
            "output_sha256": summary["output_sha256"],
            "total_size": summary["total_size"],
            "dequantized_modules": summary["dequantized"],
        }
        record["edits"] = edit_summary(summary["reports"])
        (out / "abliteration_log.json").write_text(json.dumps(record, indent=2, default=str))
    if model_card is not None:
        (out / "README.md").write_text(model_card)


def edit_summary(reports: list[EditReport]) -> dict:
    """How many modules were edited and how much refusal component survived storage."""
    quantized = [r.residual for r in reports if r.quantized]
    return {
        "modules": len(reports),
        "by_role": {role: sum(r.role == role for r in reports) for role in sorted({r.role for r in reports})},
        "max_residual_dense": max((r.residual for r in reports if not r.quantized), default=0.0),
        "quantized_modules": len(quantized),
        "mean_residual_quantized": sum(quantized) / len(quantized) if quantized else 0.0,
        "max_residual_quantized": max(quantized, default=0.0),
    }
