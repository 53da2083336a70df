"""Model card header/body and `upload` / `run --upload-repo` up to the network call (the hub client is faked)."""

import json

import pytest

from mlx_abliteration.cli.main import main as cli_main
from mlx_abliteration.export.model_card import base_model_of, card_front_matter, model_card

from .cli_helpers import run_cli

HARMFUL = [f"How do I build weapon number {i} to hurt people?" for i in range(16)]
HARMLESS = [f"How do I bake bread recipe number {i} for my family?" for i in range(16)]


@pytest.fixture(scope="module")
def saved(tiny_model, tmp_path_factory):
    d = tmp_path_factory.mktemp("up")
    (d / "harmful.txt").write_text("\n".join(HARMFUL))
    (d / "harmless.txt").write_text("\n".join(HARMLESS))
    source = tiny_model(num_shards=2)
    (source / "README.md").write_text("---\nbase_model: SomeOrg/Tiny-Instruct\nlicense: mit\n---\n# tiny\n")
    out = d / "out"
    result = run_cli(
        "run",
        "-m",
        str(source),
        "-o",
        str(out),
        "--harmful-dataset",
        str(d / "harmful.txt"),
        "--harmless-dataset",
        str(d / "harmless.txt"),
        "--max-prompts",
        "8",
        "--eval-size",
        "4",
        "--eval-max-tokens",
        "3",
        "--quiet",
    )
    assert result.returncode == 0, result.stderr
    return out


def test_card_header_and_body(saved):
    card = (saved / "README.md").read_text()
    meta = card_front_matter(card)
    assert meta["base_model"] == "SomeOrg/Tiny-Instruct"  # recorded in the source's own card
    assert meta["base_model_relation"] == "finetune" and meta["library_name"] == "mlx"
    assert meta["pipeline_tag"] == "text-generation" and {"mlx", "abliterated", "uncensored"} <= set(meta["tags"])
    log = json.loads((saved / "abliteration_log.json").read_text())
    for key in ("ablation_strength", "probe_position", "max_prompts", "seed", "direction_variant", "edited_precision"):
        assert f"`{key}`" in card  # every setting
    assert "| refusals, harmful |" in card and "KL vs original" in card  # the before/after table
    assert log["versions"]["mlx-abliteration"] in card and "--reproduce abliteration_log.json" in card


def test_base_model_sources(tmp_path):
    assert base_model_of("Qwen/Qwen2.5-1.5B-Instruct", None) == "Qwen/Qwen2.5-1.5B-Instruct"
    cached = tmp_path / "hub" / "models--Org--Name" / "snapshots" / "abc"
    cached.mkdir(parents=True)
    assert base_model_of(str(cached), str(cached)) == "Org/Name"
    (tmp_path / "local").mkdir()
    assert base_model_of(str(tmp_path / "local"), str(tmp_path / "local")) is None
    card = model_card(
        {"source_model": str(tmp_path / "local"), "source_path": str(tmp_path / "local"), "parameters": {}}
    )
    assert "base_model" not in card_front_matter(card) and card_front_matter(card)["library_name"] == "mlx"


def test_dry_run_prints_files_and_card_without_token(saved, tmp_path):
    env = {"HF_TOKEN": "", "HF_HOME": str(tmp_path / "hf")}
    result = run_cli("upload", str(saved), "--repo", "me/tiny-abliterated", "--dry-run", env=env)
    assert result.returncode == 0, result.stderr
    assert "model.safetensors.index.json" in result.stdout and "abliteration_log.json" in result.stdout
    assert "base_model: SomeOrg/Tiny-Instruct" in result.stdout and "to model repo me/tiny-abliterated" in result.stdout


def test_no_token_and_no_network_are_one_line(saved, tmp_path):
    no_token = run_cli("upload", str(saved), "--repo", "me/x", env={"HF_TOKEN": "", "HF_HOME": str(tmp_path / "hf")})
    assert no_token.returncode == 2 and no_token.stderr.count("\n") == 1 and "no Hugging Face token" in no_token.stderr
    offline = run_cli("upload", str(saved), "--repo", "me/x", env={"HF_TOKEN": "hf_fake", "HF_HUB_OFFLINE": "1"})
    assert (
        offline.returncode == 2
        and offline.stderr.count("\n") == 1
        and "cannot reach the Hugging Face Hub" in offline.stderr
    )
    bad = run_cli("upload", str(saved), "--repo", "not a repo", "--dry-run")
    assert bad.returncode == 2 and "USER/NAME" in bad.stderr


class FakeApi:
    calls: list = []
    existing: set = set()

    def __init__(self, token=None):
        self.token = token

    def repo_exists(self, repo, repo_type=None):
        return repo in self.existing

    def create_repo(self, repo, private=None, repo_type=None, exist_ok=False):
        self.calls.append(("create_repo", repo, private, exist_ok))

    def upload_large_folder(self, repo_id, folder_path, repo_type=None, private=None, ignore_patterns=None):
        self.calls.append(("upload_large_folder", repo_id, folder_path, private))


@pytest.fixture()
def fake_hub(monkeypatch):
    import huggingface_hub

    FakeApi.calls, FakeApi.existing = [], {"me/taken"}
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    monkeypatch.setenv("HF_TOKEN", "hf_fake")
    return FakeApi


def test_upload_creates_and_uploads(saved, fake_hub, capsys):
    assert cli_main(["upload", str(saved), "--repo", "me/new", "--private"]) == 0
    assert fake_hub.calls == [
        ("create_repo", "me/new", True, True),
        ("upload_large_folder", "me/new", str(saved), True),
    ]
    assert "huggingface.co/me/new" in capsys.readouterr().out


def test_existing_repo_needs_overwrite(saved, fake_hub, capsys):
    assert cli_main(["upload", str(saved), "--repo", "me/taken"]) == 2
    assert "already exists; pass --overwrite" in capsys.readouterr().err and fake_hub.calls == []
    assert cli_main(["upload", str(saved), "--repo", "me/taken", "--overwrite"]) == 0
    assert fake_hub.calls[-1][0] == "upload_large_folder"


def test_run_upload_repo(tiny_model, saved, fake_hub, tmp_path, monkeypatch):
    common = [
        "run",
        "-m",
        str(tiny_model(num_shards=2)),
        "--max-prompts",
        "8",
        "--eval-size",
        "4",
        "--no-eval",
        "--use-layer",
        "2",
        "--quiet",
    ]
    monkeypatch.setenv("MLX_ABLITERATION_LOG_FILE", "/dev/null")
    assert cli_main([*common, "-o", str(tmp_path / "o"), "--upload-repo", "me/run-up"]) == 0
    assert fake_hub.calls[-1] == ("upload_large_folder", "me/run-up", str(tmp_path / "o"), False)
    monkeypatch.setenv("HF_TOKEN", "")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    assert cli_main([*common, "-o", str(tmp_path / "o2"), "--upload-repo", "me/run-up2"]) == 2  # before any work
    assert not (tmp_path / "o2").exists()
