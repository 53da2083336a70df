"""Data-parallel probing across processes or Macs with ``mx.distributed``.

Launched with ``mlx.launch`` (ring backend over TCP/Thunderbolt, MPI, or
NCCL on GPUs), every rank loads the model, probes its own slice of the
prompts and the per-rank Welford statistics are merged exactly with two
``all_sum`` reductions (Chan et al.'s rule written as sums):

    n    = sum_r n_r
    mean = sum_r n_r * mean_r / n
    M2   = sum_r (M2_r + n_r * ||mean_r - mean||^2)

Every rank ends with the same statistics as a single process probing all
prompts (to float rounding). Run as one process it is plain ``probe_prompts``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, TypeVar

import mlx.core as mx
import mlx.nn as nn

from mlx_abliteration.errors import UserError
from mlx_abliteration.probe.capture import Progress, WelfordStats, decoder_layers, probe_prompts
from mlx_abliteration.probe.positions import ProbeSpec
from mlx_abliteration.runtime.mx_types import int_scalar

T = TypeVar("T")


def world() -> mx.distributed.Group:
    """This process's group: size 1 unless started by ``mlx.launch``."""
    return mx.distributed.init(strict=False)


def is_primary(group: mx.distributed.Group | None = None) -> bool:
    """True on the rank that writes files (rank 0), and in a single process."""
    return (group or world()).rank() == 0


def rank_slice(items: Sequence[T], group: mx.distributed.Group) -> list[T]:
    """Contiguous, near-equal share of ``items`` for this rank."""
    size, rank = group.size(), group.rank()
    start, stop = rank * len(items) // size, (rank + 1) * len(items) // size
    return list(items[start:stop])


def _all_sum(x: mx.array, group: mx.distributed.Group) -> mx.array:
    # The ring, MPI and JACCL backends reduce on the CPU stream; NCCL (set up
    # by ``mlx.launch --backend nccl``) on the GPU.
    stream = None if "NCCL_HOST_IP" in os.environ else mx.cpu
    return mx.distributed.all_sum(x, group=group, stream=stream)


def all_reduce_stats(local: WelfordStats, group: mx.distributed.Group) -> WelfordStats:
    """Merge every rank's statistics (a rank with no prompts passes count 0)."""
    count = int_scalar(_all_sum(mx.array(float(local.count)), group))
    if count == 0:
        raise UserError("no prompts to probe; check the dataset")
    mean = _all_sum(local.mean * local.count, group) / count
    spread = ((local.mean - mean) ** 2).sum(-1) * local.count
    m2 = _all_sum(local.m2 + spread, group)
    mx.eval(mean, m2)
    return WelfordStats(count, mean, m2)


def probe_prompts_distributed(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    spec: ProbeSpec = ProbeSpec(),
    layer_ids: Sequence[int] | None = None,
    batch_size: int | None = None,
    progress: Progress | None = None,
    label: str = "probe",
    group: mx.distributed.Group | None = None,
) -> WelfordStats:
    """``probe_prompts`` over all ranks of ``group``; each rank probes a slice."""
    group = group or world()
    if group.size() == 1:
        return probe_prompts(model, tokenizer, prompts, spec, layer_ids, batch_size, progress, label)
    if not prompts:
        raise UserError("no prompts to probe; check the dataset")
    mine = rank_slice(prompts, group)
    layer_ids = sorted(range(len(decoder_layers(model))) if layer_ids is None else layer_ids)
    if mine:
        local = probe_prompts(
            model, tokenizer, mine, spec, layer_ids, batch_size, progress, f"{label} (rank {group.rank()})"
        )
    else:
        local = WelfordStats.empty(len(layer_ids), _hidden_size(model))
    return all_reduce_stats(local, group)


def _hidden_size(model: nn.Module) -> int:
    args = getattr(model, "args", None)
    size = getattr(args, "hidden_size", None) or getattr(args, "n_embd", None)
    if size is None:
        raise UserError("cannot tell the model's hidden size; give every rank at least one prompt")
    return int(size)
