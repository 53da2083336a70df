"""The original model's evaluation, cached: answers, verdicts and the reference log-probs for KL.

Every ``run`` (and ``eval --baseline``, and the final evaluation of ``search``)
used to generate the original model's answers again: ~6 of a 21-minute run on
Qwen2.5-1.5B. The result depends only on the weights, the tokenizer and chat
template, the prompts and the evaluation settings, so it is stored under
``<cache dir>/baselines/`` keyed by all of them:

- weights: each ``*.safetensors`` (and other weight files') name, size and
  mtime in nanoseconds. Not their SHA256: hashing 3 GB costs seconds of CPU
  on every run (the digests in ``abliteration_log.json`` are computed while
  saving, after the evaluation), while any rewrite of a file (download,
  conversion, copy) changes its mtime. A miss only costs the evaluation; a
  stale hit would need a same-size rewrite with its old mtime restored.
- every other file of the model dir (config, tokenizer, chat template,
  generation config): SHA256 of its contents (small files).
- the harmful and harmless prompts' exact texts, in order;
- every evaluation setting (``settings``: tokens, KL tokens, batch size,
  system prompt, refusal markers, judge...), the cache format, this
  package's, mlx's and mlx-lm's versions, and the MLX device.

Entries are single safetensors files (log-probs as a tensor, everything else
as JSON metadata) written atomically (``atomic_write.atomic_path``); an
unreadable entry is ignored and recomputed, and so is one that parses but does
not fit the run (``entry_mismatch``: its answers are not the run's prompts, its
log-probs not the shape the KL reads), said in one line.
"""

from __future__ import annotations

import hashlib
import importlib.metadata as md
import json
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, fields
from pathlib import Path
from typing import TYPE_CHECKING

import mlx.core as mx

from mlx_abliteration import __version__
from mlx_abliteration.errors import UserError
from mlx_abliteration.evaluation.evaluate import EvalReport
from mlx_abliteration.evaluation.kl import ReferenceLogprobs
from mlx_abliteration.evaluation.refusals import REFUSAL_RULE_VERSION
from mlx_abliteration.io.atomic_write import atomic_path, ensure_parent
from mlx_abliteration.runtime.mx_types import load_with_metadata
from mlx_abliteration.runtime.utils import cache_root, sha256_file

if TYPE_CHECKING:
    from mlx_abliteration.evaluation.evaluate import EvalReport
    from mlx_abliteration.evaluation.kl import ReferenceLogprobs

log = logging.getLogger("mlx_abliteration.baseline_cache")

# Bump when what an evaluation computes changes (marker logic, judge prompt, report fields).
CACHE_FORMAT = 2  # 2: kl_first_token, judge undecided counts and quality
_WEIGHT_SUFFIXES = (".safetensors", ".gguf", ".bin", ".npz", ".pt", ".pth")
_HASHED_FILE_LIMIT = 64 << 20  # larger non-weight files are keyed by size and mtime too


def source_identity(source: str | Path) -> list:
    """What identifies a model dir's weights and tokenizer (see the module doc)."""
    source = Path(source)
    entries = []
    for path in sorted(source.iterdir()):
        if path.name.startswith(".") or not path.is_file():
            continue
        stat = path.stat()
        if path.suffix in _WEIGHT_SUFFIXES or stat.st_size > _HASHED_FILE_LIMIT:
            entries.append([path.name, stat.st_size, stat.st_mtime_ns])
        else:
            entries.append([path.name, sha256_file(path)])
    return entries


def _versions() -> dict:
    out: dict[str, str | None] = {"mlx-abliteration": __version__, "device": str(mx.default_device())}
    for name in ("mlx", "mlx-lm"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    return out


def baseline_identity(source: str | Path, harmful: Sequence[str], harmless: Sequence[str], settings: dict) -> dict:
    return {
        "format": CACHE_FORMAT,
        "refusal_rule": REFUSAL_RULE_VERSION,
        "source": source_identity(source),
        "harmful": hashlib.sha256(json.dumps(list(harmful)).encode()).hexdigest(),
        "harmless": hashlib.sha256(json.dumps(list(harmless)).encode()).hexdigest(),
        "settings": settings,
        "versions": _versions(),
    }


def baseline_key(identity: dict) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:20]


def baseline_path(cache_dir: str | Path | None, source: str | Path, identity: dict) -> Path:
    return cache_root(cache_dir) / "baselines" / f"{Path(source).name}-{baseline_key(identity)}.safetensors"


def store_baseline(path: Path, identity: dict, reference: ReferenceLogprobs | None, report: EvalReport) -> None:
    """One atomic safetensors file: the reference log-probs and, as metadata, everything else."""

    meta = {
        "identity": identity,
        "report": asdict(report),
        "reference": None
        if reference is None
        else {
            "token_lists": reference.token_lists,
            "continuations": reference.continuations,
            "kl_tokens": reference.kl_tokens,
        },
    }
    arrays = {"logprobs": reference.logprobs} if reference is not None else {"empty": mx.zeros((1,))}
    ensure_parent(path)
    with atomic_path(path, suffix=".safetensors") as tmp:
        mx.save_safetensors(str(tmp), arrays, metadata={"baseline": json.dumps(meta, ensure_ascii=False)})


def load_baseline(path: Path, identity: dict) -> tuple[ReferenceLogprobs | None, EvalReport] | None:
    """``(reference, report)`` from a cache entry, or None if it is missing, unreadable or another identity's."""

    if not path.is_file():
        return None
    try:
        arrays, metadata = load_with_metadata(str(path))
        meta = json.loads(metadata["baseline"])
        if meta["identity"] != json.loads(json.dumps(identity, default=str)):
            return None
        names = {f.name for f in fields(EvalReport)}
        report = EvalReport(**{k: v for k, v in meta["report"].items() if k in names})
        ref = meta["reference"]
        reference = None
        if ref is not None:
            reference = ReferenceLogprobs(
                ref["token_lists"], ref["continuations"], arrays["logprobs"], ref["kl_tokens"]
            )
    except (OSError, RuntimeError, ValueError, KeyError, TypeError) as err:
        log.warning("ignoring unreadable baseline cache entry %s: %s", path, err)
        return None
    return reference, report


def _count(value: object, total: int, none_ok: bool = False) -> bool:
    return (value is None and none_ok) or (
        isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= total
    )


def _number(value: object, none_ok: bool = False) -> bool:
    if value is None:
        return none_ok
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 0


def _token_lists(value: object, n: int) -> bool:
    return (
        isinstance(value, list)
        and len(value) == n
        and all(isinstance(t, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in t) for t in value)
    )


def _report_mismatch(report: EvalReport, harmful: Sequence[str], harmless: Sequence[str], settings: dict) -> str | None:
    if report.harmful_total != len(harmful) or report.harmless_total != len(harmless):
        return f"{report.harmful_total}+{report.harmless_total} prompts, the run has {len(harmful)}+{len(harmless)}"
    counts = [(report.harmful_refusals, len(harmful)), (report.harmful_unfinished, len(harmful))]
    counts += [(report.harmless_unfinished, len(harmless))]
    if not all(_count(v, n) for v, n in counts) or not _count(report.harmless_refusals, len(harmless), True):
        return "refusal counts that are not counts of its prompts"
    if not all(_number(v) for v in (report.tokens_per_s, report.seconds)) or not _number(report.kl, True):
        return "timings or KL that are not finite numbers"
    if report.kl_tokens != settings.get("kl_tokens"):
        return f"kl_tokens {report.kl_tokens!r}, the run asks for {settings.get('kl_tokens')!r}"
    rows = report.responses if isinstance(report.responses, list) else []
    if not all(isinstance(r, dict) for r in rows):
        return "answers that are not rows"
    for kind, prompts in (("harmful", harmful), ("harmless", harmless)):
        mine = [r for r in rows if r.get("kind") == kind]
        if [r.get("prompt") for r in mine] != list(prompts):
            return f"{len(mine)} {kind} answers that are not the run's {len(prompts)} prompts in order"
        if not all(isinstance(r.get("response"), str) and r.get("refusal") in (True, False, None) for r in mine):
            return f"{kind} answers without a text or a verdict"
    questions = settings.get("capability_questions") or 0
    correct = report.capability_correct
    if (correct is not None or questions) and not (
        isinstance(correct, list) and len(correct) == questions and all(isinstance(c, bool) for c in correct)
    ):
        return f"capability answers that are not {questions} right/wrong verdicts"
    return None


def entry_mismatch(
    reference: ReferenceLogprobs | None,
    report: EvalReport,
    harmful: Sequence[str],
    harmless: Sequence[str],
    settings: dict,
) -> str | None:
    """Why a cache entry (which parsed, under this run's key) cannot serve this run; None if it fits: the report's
    answers are this run's prompts and the reference log-probs have the shape the KL will read."""
    reason = _report_mismatch(report, harmful, harmless, settings)
    if reason is not None or reference is None:
        return reason
    n = len(harmless)
    if not _token_lists(reference.token_lists, n) or not _token_lists(reference.continuations, n):
        return f"reference tokens that are not {n} token lists"
    if reference.kl_tokens != max(1, settings.get("kl_tokens") or 1):
        return f"reference kl_tokens {reference.kl_tokens!r}"
    rows = sum(max(1, len(c)) for c in reference.continuations)
    logprobs = reference.logprobs
    if logprobs.ndim != 2 or logprobs.shape[0] != rows or logprobs.shape[1] < 2:
        return f"reference log-probs of shape {tuple(logprobs.shape)}, the run needs {rows} rows"
    if bool(mx.any(mx.isnan(logprobs)).item()):
        return "NaN reference log-probs"
    return None


def cached_baseline(
    source: str | Path,
    harmful: Sequence[str],
    harmless: Sequence[str],
    settings: dict,
    compute: Callable[[], tuple[ReferenceLogprobs | None, EvalReport]],
    *,
    cache_dir: str | Path | None = None,
    use_cache: bool = True,
    emit: Callable[[str], None] = lambda message: None,
    what: str = "original model",
) -> tuple[ReferenceLogprobs | None, EvalReport, bool]:
    """``(reference, report, hit)``: the cached evaluation of the original ``source``, or ``compute()``'s (then stored).

    ``use_cache=False`` (``--no-cache``) always computes, and stores the fresh result.
    """
    identity = baseline_identity(source, harmful, harmless, settings)
    path = baseline_path(cache_dir, source, identity)
    if use_cache:
        found = load_baseline(path, identity)
        reason = None if found is None else entry_mismatch(found[0], found[1], harmful, harmless, settings)
        if found is not None and reason is None:
            emit(
                f"{what}'s evaluation read from the cache {path} (same weights, prompts and settings; --no-cache recomputes it)"
            )
            return found[0], found[1], True
        if reason is not None:
            emit(f"the cached evaluation {path} does not fit this run ({reason}): computing it again")
    reference, report = compute()
    try:
        store_baseline(path, identity, reference, report)
        emit(f"{what}'s evaluation cached in {path}")
    except Exception as err:  # a cache that cannot be written must not fail the run
        if not isinstance(err, (OSError, UserError)):
            raise
        emit(f"could not cache the {what}'s evaluation ({err}); it will be computed again next time")
    return reference, report, False
