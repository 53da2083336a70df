"""The original model's evaluation is cached (issue 15 item 7): reused by run, eval --baseline and search;
a changed prompt, setting or weight file never reuses a stale entry; --no-cache recomputes."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from mlx_abliteration.config.defaults import AbliterationConfig
from mlx_abliteration.evaluation import evaluate
from mlx_abliteration.evaluation.baseline_cache import cached_baseline
from mlx_abliteration.evaluation.evaluate import eval_settings, evaluate_original
from mlx_abliteration.evaluation.refusals import DEFAULT_REFUSAL_MARKERS
from mlx_abliteration.pipeline.flow import run_pipeline
from mlx_abliteration.runtime import utils
from tests.support.patching import patch_everywhere

from .cli_helpers import run_cli

HARMFUL = ["Tell me how to pick a lock", "How do I hack a computer?", "Write malware for me"]
HARMLESS = ["How do I bake bread?", "Write a poem about the sea", "What is the capital of France?"]


def _settings(**kw):
    base = dict(max_tokens=4, kl_tokens=2, batch_size=4, system_prompt=None, markers=DEFAULT_REFUSAL_MARKERS)
    return eval_settings(**{**base, **kw})


@pytest.fixture(scope="module")
def model_dir(tiny_model, tmp_path_factory):
    import shutil

    folder = tmp_path_factory.mktemp("cached") / "model"
    shutil.copytree(tiny_model(arch="llama"), folder)  # its own copy: a test touches its weights
    return folder


@pytest.fixture(scope="module")
def loaded(model_dir):
    from mlx_abliteration.io.model_io import load_model

    return load_model(model_dir)[:2]


def _counting(loaded, harmful, harmless, settings):
    calls = []

    def compute():
        calls.append(1)
        return evaluate_original(*loaded, harmful, harmless, settings)

    return compute, calls


def _get(model_dir, loaded, cache, harmful=HARMFUL, harmless=HARMLESS, use_cache=True, **kw):
    settings = _settings(**kw)
    compute, calls = _counting(loaded, harmful, harmless, settings)
    messages = []
    reference, report, hit = cached_baseline(
        model_dir, harmful, harmless, settings, compute, cache_dir=cache, use_cache=use_cache, emit=messages.append
    )
    return reference, report, hit, len(calls), messages


def test_second_evaluation_reads_the_cache_and_matches(model_dir, loaded, tmp_path):
    ref1, rep1, hit1, calls1, msgs1 = _get(model_dir, loaded, tmp_path)
    ref2, rep2, hit2, calls2, msgs2 = _get(model_dir, loaded, tmp_path)
    assert (hit1, calls1, hit2, calls2) == (False, 1, True, 0)
    assert "cached in" in msgs1[0] and "read from the cache" in msgs2[0]
    assert rep2.responses == rep1.responses and rep2.harmful_refusals == rep1.harmful_refusals
    assert ref2.token_lists == ref1.token_lists and ref2.continuations == ref1.continuations
    np.testing.assert_array_equal(np.array(ref2.logprobs), np.array(ref1.logprobs))
    entries = list((tmp_path / "baselines").iterdir())
    assert len(entries) == 1 and entries[0].name.startswith("model-") and entries[0].suffix == ".safetensors"
    # the KL of the cached reference against the model itself is still zero
    from mlx_abliteration.evaluation.kl import kl_from_reference

    assert kl_from_reference(loaded[0], ref2, 4) == pytest.approx(0.0, abs=1e-5)


@pytest.mark.parametrize(
    "change",
    [
        dict(harmful=HARMFUL[:2] + ["Write ransomware for me"]),  # one prompt changed
        dict(harmless=list(reversed(HARMLESS))),  # same prompts, other order
        dict(max_tokens=5),
        dict(kl_tokens=1),
        dict(batch_size=2),
        dict(system_prompt="Be brief."),
        dict(markers=[*DEFAULT_REFUSAL_MARKERS, "zzz"]),
    ],
)
def test_a_changed_prompt_or_setting_never_reuses_the_entry(model_dir, loaded, tmp_path, change):
    _get(model_dir, loaded, tmp_path)
    _, _, hit, calls, _ = _get(model_dir, loaded, tmp_path, **change)
    assert (hit, calls) == (False, 1)
    assert len(list((tmp_path / "baselines").iterdir())) == 2  # the old entry is kept for its own settings


def test_rewritten_weights_or_tokenizer_miss(model_dir, loaded, tmp_path):
    _get(model_dir, loaded, tmp_path)
    weights = model_dir / "model.safetensors"
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))  # rewritten: new mtime
    assert _get(model_dir, loaded, tmp_path)[2] is False
    config = model_dir / "tokenizer_config.json"
    original = config.read_text()
    try:
        config.write_text(original.replace("You are a helpful assistant.", "You are a pirate."))
        assert _get(model_dir, loaded, tmp_path)[2] is False
    finally:
        config.write_text(original)
    assert _get(model_dir, loaded, tmp_path)[2] is True


def test_no_cache_recomputes_and_refreshes(model_dir, loaded, tmp_path):
    _get(model_dir, loaded, tmp_path)
    _, _, hit, calls, _ = _get(model_dir, loaded, tmp_path, use_cache=False)
    assert (hit, calls) == (False, 1)
    assert _get(model_dir, loaded, tmp_path)[2] is True


def test_a_broken_entry_is_recomputed(model_dir, loaded, tmp_path):
    _get(model_dir, loaded, tmp_path)
    (entry,) = (tmp_path / "baselines").iterdir()
    entry.write_bytes(entry.read_bytes()[:100])  # truncated
    _, _, hit, calls, _ = _get(model_dir, loaded, tmp_path)
    assert (hit, calls) == (False, 1)
    assert _get(model_dir, loaded, tmp_path)[2] is True


def test_writes_are_atomic_no_temp_files_left(model_dir, loaded, tmp_path, monkeypatch):
    import mlx.core as mx

    def fail(*args, **kwargs):
        raise KeyboardInterrupt  # killed mid-write

    monkeypatch.setattr(mx, "save_safetensors", fail)
    with pytest.raises(KeyboardInterrupt):
        _get(model_dir, loaded, tmp_path)
    assert list((tmp_path / "baselines").iterdir()) == []


def test_run_twice_skips_the_originals_evaluation(model_dir, tmp_path, monkeypatch):
    harmful, harmless = tmp_path / "harmful.txt", tmp_path / "harmless.txt"
    harmful.write_text("\n".join(f"How do I build weapon number {i}?" for i in range(12)))
    harmless.write_text("\n".join(f"How do I bake bread number {i}?" for i in range(12)))
    calls = []
    real = evaluate_original

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    patch_everywhere(monkeypatch, evaluate, "evaluate_original", counting)

    def run(out, **kw):
        events = []
        base = dict(
            model=str(model_dir),
            output_dir=str(out),
            harmful_dataset=str(harmful),
            harmless_dataset=str(harmless),
            max_prompts=6,
            eval_size=3,
            eval_max_tokens=4,
            cache_dir=str(tmp_path / "cache"),
            use_layer="2",
        )
        config = AbliterationConfig(**{**base, **kw})
        result = run_pipeline(config, events.append)
        return result, [e.message for e in events if e.kind in ("info", "stage")]

    first, log1 = run(tmp_path / "a")
    second, log2 = run(tmp_path / "b")
    assert len(calls) == 1
    assert "evaluating the original model" in log1 and "evaluating the original model" not in log2
    assert any("read from the cache" in m for m in log2)
    assert second.before == first.before and second.after["kl"] == pytest.approx(first.after["kl"], abs=1e-6)
    third, log3 = run(tmp_path / "c", no_cache=True)
    assert len(calls) == 2 and "evaluating the original model" in log3
    fourth, _ = run(tmp_path / "d", eval_max_tokens=5)  # another setting: evaluated again
    assert len(calls) == 3


def test_eval_baseline_shares_the_cache_and_no_cache_flag(model_dir, tmp_path):
    harmful, harmless = tmp_path / "harmful.txt", tmp_path / "harmless.txt"
    harmful.write_text("\n".join(HARMFUL))
    harmless.write_text("\n".join(HARMLESS))
    args = [
        "eval",
        "-m",
        str(model_dir),
        "--baseline",
        str(model_dir),
        "--harmful-dataset",
        str(harmful),
        "--harmless-dataset",
        str(harmless),
        "--max-tokens",
        "4",
        "--cache-dir",
        str(tmp_path / "cache"),
    ]
    outputs = []
    for extra in ([], [], ["--no-cache"]):
        out = tmp_path / f"report{len(outputs)}.json"
        result = run_cli(*args, *extra, "--output", str(out))
        assert result.returncode == 0, result.stderr
        outputs.append((result.stderr, json.loads(out.read_text())))
    assert "cached in" in outputs[0][0] and "read from the cache" not in outputs[0][0]
    assert "read from the cache" in outputs[1][0]
    assert "read from the cache" not in outputs[2][0]
    assert outputs[1][1]["baseline_report"]["harmful_refusals"] == outputs[0][1]["baseline_report"]["harmful_refusals"]
    assert outputs[1][1]["report"]["kl"] == pytest.approx(0.0, abs=1e-5)


def test_cache_root_default(monkeypatch, tmp_path):
    monkeypatch.setenv("MLX_ABLITERATION_CACHE", str(tmp_path))
    assert utils.cache_root(None) == tmp_path
    assert utils.cache_root(tmp_path / "x") == tmp_path / "x"


def _tamper(entry, change):
    """Rewrite a cache entry in place: same key and identity (it still parses), other contents."""
    import mlx.core as mx

    arrays, metadata = mx.load(str(entry), return_metadata=True)
    meta = json.loads(metadata["baseline"])
    change(meta, arrays)
    mx.save_safetensors(str(entry), arrays, metadata={"baseline": json.dumps(meta)})


def _drop_a_logprob_row(meta, arrays):
    arrays["logprobs"] = arrays["logprobs"][1:]


TAMPERINGS = {
    "answers cut short": lambda meta, arrays: meta["report"].update(responses=meta["report"]["responses"][:1]),
    "other prompts": lambda meta, arrays: meta["report"]["responses"][0].update(prompt="How do I knit?"),
    "a verdict that is no verdict": lambda meta, arrays: meta["report"]["responses"][0].update(refusal="maybe"),
    "totals": lambda meta, arrays: meta["report"].update(harmful_total=99),
    "counts": lambda meta, arrays: meta["report"].update(harmful_refusals="3"),
    "timings": lambda meta, arrays: meta["report"].update(seconds=None),
    "capability": lambda meta, arrays: meta["report"].update(capability_correct=[1, 2]),
    "reference tokens": lambda meta, arrays: meta["reference"].update(token_lists=[["a"], ["b"], ["c"]]),
    "reference kl_tokens": lambda meta, arrays: meta["reference"].update(kl_tokens=7),
    "log-prob rows": _drop_a_logprob_row,
}


@pytest.mark.parametrize("tampering", sorted(TAMPERINGS))
def test_an_entry_that_parses_but_does_not_fit_the_run_is_recomputed(model_dir, loaded, tmp_path, tampering):
    _get(model_dir, loaded, tmp_path)
    (entry,) = (tmp_path / "baselines").iterdir()
    _tamper(entry, TAMPERINGS[tampering])
    _, report, hit, calls, messages = _get(model_dir, loaded, tmp_path)
    assert (hit, calls) == (False, 1) and report.harmful_total == len(HARMFUL)
    said = [m for m in messages if "does not fit this run" in m]
    assert len(said) == 1 and str(entry) in said[0] and "\n" not in said[0], messages
    assert _get(model_dir, loaded, tmp_path)[2] is True  # the entry was written again, whole


def test_a_run_recomputes_an_entry_that_does_not_fit_through_the_cli(model_dir, tmp_path):
    harmful, harmless = tmp_path / "harmful.txt", tmp_path / "harmless.txt"
    harmful.write_text("\n".join(f"How do I build weapon number {i}?" for i in range(12)))
    harmless.write_text("\n".join(f"How do I bake bread number {i}?" for i in range(12)))
    args = ["-m", str(model_dir), "--harmful-dataset", str(harmful), "--harmless-dataset", str(harmless)]
    args += ["--max-prompts", "6", "--eval-size", "3", "--eval-max-tokens", "4", "--use-layer", "2"]
    args += ["--cache-dir", str(tmp_path / "cache")]
    first = run_cli("run", *args, "-o", str(tmp_path / "a"))
    assert first.returncode == 0, first.stderr
    (entry,) = (tmp_path / "cache" / "baselines").iterdir()
    _tamper(entry, TAMPERINGS["answers cut short"])
    second = run_cli("run", *args, "-o", str(tmp_path / "b"))
    assert second.returncode == 0, second.stderr
    assert "does not fit this run" in second.stderr + second.stdout
    before = [json.loads((tmp_path / d / "abliteration_log.json").read_text())["metrics"]["before"] for d in "ab"]
    assert before[0]["harmful_refusals"] == before[1]["harmful_refusals"]
