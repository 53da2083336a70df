"""The CLI keeps transformers from importing PyTorch (seconds of startup where CUDA torch is installed)."""

import os

import pytest

from tests.cli_helpers import run_cli

# A stand-in "torch" package that records being imported. It ships no
# dist-info, so transformers' availability check falls back to importing it.
FAKE_TORCH = 'import os\nopen(os.environ["FAKE_TORCH_MARKER"], "w").close()\n__version__ = "2.9.0"\n'


@pytest.fixture
def fake_torch(tmp_path):
    site = tmp_path / "site"
    (site / "torch").mkdir(parents=True)
    (site / "torch" / "__init__.py").write_text(FAKE_TORCH)
    marker = tmp_path / "torch-was-imported"
    env = {
        "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]),
        "FAKE_TORCH_MARKER": str(marker),
    }
    return env, marker


def _probe(model, tmp_path, env):
    return run_cli(
        "probe", "-m", str(model), "--max-prompts", "2", "--eval-size", "0", "--use-layer", "1",
        "--output", str(tmp_path / "d.safetensors"), env=env,
    )  # fmt: skip


def test_cli_never_imports_torch(tiny_model, tmp_path, fake_torch):
    env, marker = fake_torch
    proc = _probe(tiny_model(), tmp_path, env)
    assert proc.returncode == 0, proc.stderr
    assert not marker.exists()


def test_torch_env_keeps_torch_importable(tiny_model, tmp_path, fake_torch):
    # The control: the stand-in is visible to transformers, so the test above can fail.
    env, marker = fake_torch
    _probe(tiny_model(), tmp_path, {**env, "MLX_ABLITERATION_TORCH": "1"})
    assert marker.exists()
