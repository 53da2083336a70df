"""Broken model folders: one-line errors that say what is wrong and how to fix it, before any work."""

from __future__ import annotations

import json
import shutil

import pytest

from mlx_abliteration.errors import UserError

from .cli_helpers import assert_one_line_error, run_cli

PROMPTS = [f"prompt number {i}" for i in range(8)]


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    folder = tmp_path_factory.mktemp("prompts")
    (folder / "harmful.txt").write_text("\n".join("how to do harm " + p for p in PROMPTS))
    (folder / "harmless.txt").write_text("\n".join("how to bake " + p for p in PROMPTS))
    return folder


def _copy(tiny_model, tmp_path, **kwargs):
    model = tmp_path / "model"
    shutil.copytree(tiny_model(**kwargs), model)
    return model


def _edit_json(path, change):
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def _probe(model, prompts, tmp_path):
    out = tmp_path / "d.safetensors"
    proc = run_cli(
        "probe",
        "-m",
        str(model),
        "--harmful-dataset",
        str(prompts / "harmful.txt"),
        "--harmless-dataset",
        str(prompts / "harmless.txt"),
        "--max-prompts",
        "4",
        "--eval-size",
        "0",
        "--use-layer",
        "1",
        "--output",
        str(out),
    )
    assert not out.exists()
    return proc


def _assert_one_line(proc, *needles):
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: "), proc.stderr
    for needle in needles:
        assert needle in last, last
    return last


def test_config_that_is_a_list(tiny_model, prompts, tmp_path):
    model = _copy(tiny_model, tmp_path)
    (model / "config.json").write_text("[1, 2]")
    _assert_one_line(_probe(model, prompts, tmp_path), "config.json holds a JSON list", "restore")


def test_config_without_model_type(tiny_model, prompts, tmp_path):
    model = _copy(tiny_model, tmp_path)
    _edit_json(model / "config.json", lambda c: c.pop("model_type"))
    _assert_one_line(_probe(model, prompts, tmp_path), 'has no "model_type"', '"model_type": "llama"')


@pytest.mark.parametrize("model_type", ["frobnicator", "rope_utils", "switch_layers", "base", "llama.sub"])
def test_unknown_model_type(tiny_model, prompts, tmp_path, model_type):
    """Not an mlx-lm model: no such module, or a module of mlx_lm.models that is not a model (rope_utils)."""
    model = _copy(tiny_model, tmp_path)
    _edit_json(model / "config.json", lambda c: c.update(model_type=model_type))
    assert_one_line_error(_probe(model, prompts, tmp_path), f"{model_type!r}", "does not support", "upgrade mlx-lm")


def test_missing_tokenizer(tiny_model, prompts, tmp_path):
    model = _copy(tiny_model, tmp_path)
    for file in model.glob("tokenizer*"):
        file.unlink()
    _assert_one_line(_probe(model, prompts, tmp_path), "has no tokenizer", "copy the tokenizer files")


def test_tokenizer_that_needs_custom_code(tiny_model, prompts, tmp_path):
    model = _copy(tiny_model, tmp_path)
    _edit_json(
        model / "tokenizer_config.json",
        lambda c: c.update(
            tokenizer_class="FancyTokenizer", auto_map={"AutoTokenizer": ["tokenization_fancy.FancyTokenizer", None]}
        ),
    )
    proc = _probe(model, prompts, tmp_path)
    assert_one_line_error(proc, "needs custom Python code (auto_map")
    said = proc.stdout + proc.stderr
    assert "[y/N]" not in said and "custom code which must be executed" not in said, said  # transformers' prompt


def test_index_naming_a_missing_shard(tiny_model, prompts, tmp_path):
    model = _copy(tiny_model, tmp_path, num_shards=2)
    index = json.loads((model / "model.safetensors.index.json").read_text())
    gone = sorted(set(index["weight_map"].values()))[-1]
    (model / gone).unlink()
    last = _assert_one_line(_probe(model, prompts, tmp_path), f"missing weight shard(s) {gone}", "download")
    assert "Missing" not in last


def test_unreadable_config(tiny_model, tmp_path, monkeypatch):
    """Permissions cannot be tested as root, so the read itself fails here."""
    from pathlib import Path

    from mlx_abliteration.io.model_io import load_model

    model = _copy(tiny_model, tmp_path)
    real = Path.read_text

    def denied(self, *args, **kwargs):
        if self.name == "config.json":
            raise PermissionError(13, "Permission denied", str(self))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", denied)
    with pytest.raises(UserError, match=r"cannot read .*config\.json \(Permission denied\); fix its permissions"):
        load_model(model)


def test_nan_weight_is_blamed_on_the_model_not_the_datasets(tiny_model, prompts, tmp_path):
    import mlx.core as mx

    model = _copy(tiny_model, tmp_path)
    tensors, metadata = mx.load(str(model / "model.safetensors"), return_metadata=True)
    name = next(k for k in sorted(tensors) if "layers.0.mlp.down_proj.weight" in k)
    tensors[name] = mx.full(tensors[name].shape, float("nan"), dtype=tensors[name].dtype)
    mx.save_safetensors(str(model / "model.safetensors"), tensors, metadata=metadata)
    last = _assert_one_line(_probe(model, prompts, tmp_path), name, "NaN or inf", "corrupt")
    assert "datasets do not separate" not in last


def test_nan_activations_are_not_called_a_dataset_problem():
    import mlx.core as mx

    from mlx_abliteration.probe.directions import calculate_refusal_direction

    harmful = mx.array([float("inf"), 1.0, 2.0])
    with pytest.raises(UserError, match="NaN/inf activations \\(not a problem of the datasets\\)"):
        calculate_refusal_direction(harmful, mx.array([0.0, 1.0, 2.0]))


BROKEN_TEMPLATES = {
    "missing": (None, "has no chat template (a base model?)"),
    "raises": (
        "{{ raise_exception('System role not supported') }}",
        "fails (TemplateError: System role not supported)",
    ),
    "does not parse": ("{% for m in messages %}{{ m.content }", "fails (TemplateSyntaxError"),
    "undefined": ("{{ messages[0].content.nope() }}", "fails (UndefinedError"),
}


def break_chat_template(model, kind: str) -> str:
    """Give ``model`` a missing or broken chat template; the message the error must hold."""
    template, message = BROKEN_TEMPLATES[kind]
    _edit_json(
        model / "tokenizer_config.json",
        lambda c: c.pop("chat_template") if template is None else c.update(chat_template=template),
    )
    return message


@pytest.mark.parametrize("command", ["run", "eval"])
@pytest.mark.parametrize("kind", sorted(BROKEN_TEMPLATES))
def test_a_chat_template_that_is_missing_raises_or_does_not_parse_is_one_line(
    tiny_model, prompts, tmp_path, kind, command
):
    model = _copy(tiny_model, tmp_path)
    message = break_chat_template(model, kind)
    data = ["--harmful-dataset", str(prompts / "harmful.txt"), "--harmless-dataset", str(prompts / "harmless.txt")]
    if command == "run":
        args = ["run", "-m", str(model), "-o", str(tmp_path / "out"), *data, "--max-prompts", "4", "--eval-size", "2"]
    else:
        args = ["eval", "-m", str(model), *data, "--max-tokens", "2"]
    proc = run_cli(*args)
    last = assert_one_line_error(proc, message, str(model), "chat_template")
    assert "probing" not in proc.stderr and not (tmp_path / "out").exists(), last
