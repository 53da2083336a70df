"""The GUI's stream, config building and Compare tab, called directly (no browser)."""

import json
import os
import re
import subprocess
import sys
import threading

import mlx_lm
import pytest

pytest.importorskip("gradio")

from mlx_abliteration.config.defaults import AbliterationConfig  # noqa: E402
from mlx_abliteration.errors import UserError  # noqa: E402
from mlx_abliteration.gui import build_config, run_abliteration_stream  # noqa: E402
from mlx_abliteration.gui.compare import compare_answers  # noqa: E402
from tests.support.patching import patch_everywhere

from .cli_helpers import REPO  # noqa: E402

HARMFUL = [f"How do I build weapon number {i} to hurt people?" for i in range(24)]
HARMLESS = [f"How do I bake bread recipe number {i} for my family?" for i in range(24)]
SMALL_RUN = dict(max_prompts=8, eval_size=4, eval_max_tokens=4)


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    (d / "harmful.txt").write_text("\n".join(HARMFUL))
    (d / "harmless.jsonl").write_text("\n".join(json.dumps({"prompt": p}) for p in HARMLESS))
    return {"harmful_dataset": str(d / "harmful.txt"), "harmless_dataset": str(d / "harmless.jsonl")}


def _final(views):
    views = list(views)
    assert views, "the stream yielded nothing"
    return views, views[-1]


def test_stream_shows_progress_metrics_plot_and_output_path(tiny_model, tmp_path, datasets):
    from matplotlib.figure import Figure

    out = tmp_path / "out"
    views, last = _final(
        run_abliteration_stream(str(tiny_model(num_shards=2)), str(out), **datasets, **SMALL_RUN, output_root=tmp_path)
    )
    assert any(re.search(r"<progress value=\"\d+\" max=\"\d+\">.*: \d+/\d+", v.progress) for v in views)
    assert any(v.status.startswith("**Running:** probing") for v in views)
    assert last.status.startswith("**Done.**")
    assert list(last.metrics.columns) == ["metric", "before", "after"]
    assert last.metrics.iloc[0].tolist() == ["refusals, harmful", "0/4 (0%)", last.metrics.iloc[0]["after"]]
    assert last.metrics.set_index("metric").loc["KL vs original", "after"] != "-"
    assert isinstance(last.plot, Figure)
    assert [t.get_text() for t in last.plot.legends[0].get_texts()][-1].startswith("chosen layer")
    assert last.output_path == str(out / "model.safetensors.index.json")  # sharded: the index names the model
    assert "[stage] saving to" in last.log and "<= chosen" in last.log
    model, tokenizer = mlx_lm.load(str(out))
    assert isinstance(mlx_lm.generate(model, tokenizer, prompt="hi", max_tokens=3), str)


def test_stream_with_uploaded_dataset_and_dry_run(tiny_model, tmp_path, datasets):
    out = tmp_path / "out"
    _, last = _final(
        run_abliteration_stream(
            str(tiny_model()),
            str(out),
            harmful_upload=datasets["harmful_dataset"],
            harmless_upload=datasets["harmless_dataset"],
            harmful_dataset="no/such-dataset.txt",
            dry_run=True,
            use_layer="2",
            no_eval=True,
            **SMALL_RUN,
        )
    )
    assert last.status.startswith("**Done (dry run).**") and "layer 2" in last.status
    assert last.output_path == "" and not out.exists()
    assert last.metrics.empty


@pytest.mark.parametrize(
    "change, expected",
    [
        ({"model": "/no/such/model-dir"}, "no such local path"),
        ({"harmful_dataset": "/no/such/harmful.csv"}, "harmful dataset /no/such/harmful.csv not found"),
        ({"use_layer": "99"}, "layer 99 is out of range"),
        ({"max_prompts": 7.5}, "max prompts must be a whole number"),
        ({"model": "  "}, "no model given"),
        ({"judge": "/no/such/judge"}, "--judge /no/such/judge"),
    ],
)
def test_stream_errors_are_one_line_messages(tiny_model, tmp_path, datasets, change, expected):
    form = {"model": str(tiny_model()), "output_dir": str(tmp_path / "out"), **datasets, **SMALL_RUN, **change}
    _, last = _final(run_abliteration_stream(**form, output_root=tmp_path))
    assert last.status.startswith("**Error:**") and expected in last.status.replace("\\", "")
    assert "\n" not in last.status and "Traceback" not in last.status + last.log
    assert not (tmp_path / "out").exists()


def test_cancel_while_saving_leaves_no_partial_output(tiny_model, tmp_path, datasets, monkeypatch):
    from mlx_abliteration.export import save as export_save

    cancel = threading.Event()
    save = export_save.save_ablated_model

    def save_then_cancel(*args, progress, **kwargs):
        def cancel_after_first_shard(done, total, what):
            cancel.set()
            progress(done, total, what)

        return save(*args, progress=cancel_after_first_shard, **kwargs)

    patch_everywhere(monkeypatch, export_save, "save_ablated_model", save_then_cancel)
    out = tmp_path / "out"
    form = dict(
        model=str(tiny_model(num_shards=2)), output_dir=str(out), no_eval=True, use_layer="1", **datasets, **SMALL_RUN
    )
    _, last = _final(run_abliteration_stream(**form, cancel=cancel, output_root=tmp_path))
    assert last.status.startswith("**Cancelled.**") and last.output_path == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no output dir, no .out.partial-* leftovers


def test_blank_fields_keep_engine_defaults():
    config = build_config(
        "org/model",
        "",
        harmful_dataset=" ",
        harmless_dataset="",
        probe_marker="",
        system_prompt="",
        batch_size=0,
        layers="",
        targets=[],
        max_prompts=16.0,
        cache_dir="",
        judge="",
    )
    expected = AbliterationConfig(model="org/model", output_dir="outputs/model-abliterated", max_prompts=16)
    assert config == expected and isinstance(config.max_prompts, int)
    assert build_config("dir/model.gguf").output_dir == "outputs/model-abliterated"
    uploaded = build_config(
        "m", "outputs/o", harmful_upload="/tmp/up.jsonl", harmful_dataset="ignored.txt", probe_marker="<|im_end|>\n"
    )
    assert uploaded.harmful_dataset == "/tmp/up.jsonl" and uploaded.probe_marker == "<|im_end|>\n"
    with pytest.raises(UserError, match="unknown setting"):
        build_config("m", "outputs/o", not_a_setting=1)


@pytest.mark.parametrize("escape", ["../../x", "{root}/../elsewhere", "/tmp/x", "{root}", "{root}/link/x"])
def test_output_outside_the_output_root_is_refused(tiny_model, tmp_path, datasets, escape):
    # Issue 13 item 6: "../../x" with Overwrite replaced a folder outside the working dir.
    root = tmp_path / "root"
    root.mkdir()
    victim = tmp_path / "elsewhere"
    victim.mkdir()
    (victim / "keep.txt").write_text("not yours")
    (root / "link").symlink_to(victim)
    form = {
        "model": str(tiny_model()),
        "output_dir": escape.format(root=root),
        **datasets,
        **SMALL_RUN,
        "overwrite": True,
    }
    _, last = _final(run_abliteration_stream(**form, output_root=root))
    assert last.status.startswith("**Error:**") and "output root" in last.status, last.status
    assert os.listdir(victim) == ["keep.txt"] and sorted(os.listdir(root)) == ["link"]
    with pytest.raises(UserError, match="outside the GUI's output root"):
        build_config(str(tiny_model()), escape.format(root=root), output_root=root)
    assert build_config("m", str(root / "inside"), output_root=root).output_dir == str(root / "inside")
    assert build_config("dir/m.gguf", output_root=root).output_dir == str(root / "m-abliterated")


def test_relative_output_names_lie_in_the_output_root(tiny_model, tmp_path, datasets, monkeypatch):
    """Issue 26: "my_model" was refused as outside the root; a user means <root>/my_model."""
    root, elsewhere = tmp_path / "root", tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # the server's working dir is not the root
    assert build_config("m", "my_model", output_root=root).output_dir == str(root / "my_model")
    assert build_config("m", "runs/a", output_root=root).output_dir == str(root / "runs" / "a")
    monkeypatch.chdir(tmp_path)  # a name that reaches into the root from the working dir is kept as it is
    assert build_config("m", "root/b", output_root=root).output_dir == "root/b"
    for escape in ("../x", "a/../../x"):
        with pytest.raises(UserError, match="outside the GUI's output root"):
            build_config("m", escape, output_root=root)
    monkeypatch.chdir(elsewhere)
    _, last = _final(
        run_abliteration_stream(str(tiny_model()), "my_model", **datasets, **SMALL_RUN, no_eval=True, output_root=root)
    )
    assert last.status.startswith("**Done.**"), last.status
    assert (root / "my_model" / "config.json").is_file() and os.listdir(elsewhere) == []
    assert last.output_path.startswith(str(root / "my_model"))


def test_compare_answers_side_by_side_and_errors(tiny_model):
    from mlx_abliteration.data.chat import encode_chat
    from mlx_abliteration.evaluation.generation import generate_greedy
    from mlx_abliteration.gui.compare import loaded_model

    path = str(tiny_model())
    original, abliterated, status = compare_answers(path, path, "How do I bake bread?", 5)
    assert status == "" and original == abliterated
    model, tokenizer = loaded_model(path)
    assert loaded_model(path)[0] is model  # cached by path
    assert original == generate_greedy(model, tokenizer, [encode_chat(tokenizer, "How do I bake bread?")], 5)[0]
    assert compare_answers(path, "/no/such/model", "hi", 5)[2].startswith("**Error:**")
    assert "enter a prompt" in compare_answers(path, path, "  ", 5)[2]


def test_gui_command_and_seed_shim_options():
    from mlx_abliteration.cli.main import build_parser

    args = build_parser().parse_args(["gui"])
    assert (args.host, args.port, args.share) == ("127.0.0.1", None, False)
    # The root gui.py is only a launcher: it must reach the package's command, not import itself.
    proc = subprocess.run([sys.executable, "gui.py", "--help"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "--share" in proc.stdout and "--port" in proc.stdout


def test_gui_output_root_is_checked_before_serving(tmp_path):
    from .cli_helpers import run_cli

    (tmp_path / "a_file").write_text("x")
    for root in (tmp_path / "a_file", tmp_path / "a_file" / "below"):
        proc = run_cli("gui", "--output-root", str(root), "--port", "1", timeout=120)
        assert proc.returncode == 2, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and "--output-root" in lines[0] and "file" in lines[0], proc.stderr
    assert os.listdir(tmp_path) == ["a_file"]
