"""What a run records: abliteration_log.json's entries (settings, stats, metrics, versions) and the evaluation answers."""

from __future__ import annotations

import importlib.metadata as md
import json
import platform
import time

from mlx_abliteration import __version__


def versions() -> dict:
    out = {"mlx-abliteration": __version__, "python": platform.python_version(), "platform": platform.platform()}
    for name in ("mlx", "mlx-lm", "numpy", "tokenizers", "transformers"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return out


def build_record(config, source, model_config, directions, layer, candidates, plan, before, after, started) -> dict:
    return {
        "tool": "mlx-abliteration",
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "source_model": str(config.model),
        "source_path": str(source),
        "model_type": model_config.get("model_type"),
        "parameters": config.to_dict(),
        "chosen_layer": layer,
        "layer_stats": [s.to_dict() for s in directions.stats],
        "auto_candidates": [c.to_dict() for c in candidates],
        "plan": plan.to_dict(),
        "metrics": {"before": before and before.to_dict(), "after": after and after.to_dict()},
        "seconds": time.perf_counter() - started,
        "versions": versions(),
    }


RESPONSES_FILE = "evaluation_responses.jsonl"


def responses_jsonl(before, after) -> str | None:
    """Every evaluation answer, before and after, one JSON object per line."""

    rows = []
    for which, report in (("before", before), ("after", after)):
        if report is not None:
            rows += [json.dumps({"model": which, **r}, ensure_ascii=False) for r in report.responses]
    return "\n".join(rows) + "\n" if rows else None
