"""bench/cpu_run.py: phases read from a real run's JSON log, peak RSS and the ratio to the weights."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.cpu_run import phase_seconds, run_once  # noqa: E402


def _event(t: str, message: str, kind: str = "stage") -> str:
    return json.dumps({"time": f"2026-11-30T22:{t}+00:00", "message": message, "extra_info": {"event": kind}})


def test_each_stage_lasts_until_the_next_event():
    log = [
        _event("45:00.000", "loading /m"),
        _event("45:20.000", "finding the residual writers"),
        _event("45:24.500", "57 residual writers", kind="info"),
        _event("45:30.000", "probing 28 layers at position 'last'"),
        _event("47:30.000", "saving to /o"),
        _event("47:48.000", "finished", kind="done"),
    ]
    assert phase_seconds(log) == {"load": 20.0, "writers": 4.5, "probe": 120.0, "save": 18.0}


def test_a_real_run_on_a_tiny_model(tiny_model, tmp_path):
    result = run_once(tiny_model(), tmp_path / "out", ["--no-eval", "--use-layer", "1", "--max-prompts", "8"])
    assert result["returncode"] == 0, result
    assert {"load", "writers", "probe", "save"} <= set(result["phases_seconds"])
    assert result["peak_rss_bytes"] > 0 and result["peak_rss_over_weights"] > 0
    assert (tmp_path / "out" / "config.json").exists()
