"""--probe-mode streamed through the pipeline and the CLI entry point."""

import json

import mlx.core as mx

from mlx_abliteration.cli.main import main
from mlx_abliteration.config.defaults import AbliterationConfig
from mlx_abliteration.config.schema import build_config
from mlx_abliteration.pipeline.flow import run_pipeline
from mlx_abliteration.probe.directions import load_directions

HARMFUL = [f"How do I build weapon number {i} to hurt people?" for i in range(10)]
HARMLESS = [f"How do I bake bread recipe number {i} for my family?" for i in range(10)]


def _datasets(tmp_path):
    (tmp_path / "harmful.txt").write_text("\n".join(HARMFUL))
    (tmp_path / "harmless.txt").write_text("\n".join(HARMLESS))
    return dict(
        harmful_dataset=str(tmp_path / "harmful.txt"),
        harmless_dataset=str(tmp_path / "harmless.txt"),
        max_prompts=8,
        eval_size=2,
    )


def test_streamed_run_matches_memory_run(tiny_model, tmp_path):
    model = tiny_model(num_shards=2)
    base = AbliterationConfig(model=str(model), use_layer="2", **_datasets(tmp_path))
    memory = run_pipeline(build_config({"output_dir": str(tmp_path / "mem"), "no_eval": True}, base))
    events = []
    streamed = run_pipeline(
        build_config({"output_dir": str(tmp_path / "st"), "probe_mode": "streamed"}, base), events.append
    )
    assert streamed.before is None and any("evaluation is skipped" in e.message for e in events)
    assert mx.abs(streamed.directions.directions - memory.directions.directions).max().item() <= 1e-4
    for name in ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"):
        a, b = mx.load(str(tmp_path / "mem" / name)), mx.load(str(tmp_path / "st" / name))
        assert all(mx.allclose(a[k], b[k], rtol=1e-4, atol=1e-5).item() for k in a)


def test_cli_probe_streamed_auto_layer(tiny_model, tmp_path):
    model = tiny_model(num_shards=2)
    data = _datasets(tmp_path)
    out = tmp_path / "dirs.safetensors"
    code = main(
        [
            "probe",
            "-m",
            str(model),
            "--output",
            str(out),
            "--probe-mode",
            "streamed",
            "--stats-json",
            str(tmp_path / "s.json"),
            "--harmful-dataset",
            data["harmful_dataset"],
            "--harmless-dataset",
            data["harmless_dataset"],
            "--max-prompts",
            "8",
            "--eval-size",
            "2",
            "--quiet",
        ]
    )
    assert code == 0
    directions, layer = load_directions(out)
    assert layer == json.loads((tmp_path / "s.json").read_text())["chosen_layer"]
    assert 1 <= layer < 4 and len(directions.layers) == 4
