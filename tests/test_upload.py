"""Model card header/body and `upload` / `run --upload-repo` up to the network call (the hub client is faked)."""

import json

import pytest

from mlx_abliteration.cli.main import main as cli_main
from mlx_abliteration.export.model_card import base_model_of, card_front_matter, model_card

from .cli_helpers import assert_one_line_error, run_cli

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

    def upload_file(self, path_or_fileobj, path_in_repo, repo_id, repo_type=None, commit_message=None):
        self.calls.append(("upload_file", path_in_repo, repo_id, path_or_fileobj.decode()[:3]))


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


def _snapshot(folder):
    return {str(p.relative_to(folder)): (p.stat().st_mode, p.read_bytes()) for p in sorted(folder.rglob("*"))} | {
        ".": folder.stat().st_mode
    }


@pytest.fixture()
def without_card(saved, tmp_path):
    """A read-only copy of the saved folder without its README.md (the card is made from the log)."""
    import shutil

    folder = tmp_path / "ro"
    shutil.copytree(saved, folder)
    (folder / "README.md").unlink()
    for p in [*folder.rglob("*"), folder]:
        p.chmod(p.stat().st_mode & ~0o222)
    yield folder
    for p in [folder, *folder.rglob("*")]:
        p.chmod(p.stat().st_mode | 0o200)


def test_dry_run_writes_nothing_even_into_a_read_only_folder(without_card):
    before = _snapshot(without_card)
    result = run_cli("upload", str(without_card), "--repo", "me/tiny", "--dry-run", env={"HF_TOKEN": ""})
    assert result.returncode == 0, result.stderr
    assert "README.md" in result.stdout and "base_model: SomeOrg/Tiny-Instruct" in result.stdout  # made in memory
    assert _snapshot(without_card) == before


def test_a_card_made_from_the_log_is_uploaded_from_memory(without_card, fake_hub):
    before = _snapshot(without_card)
    assert cli_main(["upload", str(without_card), "--repo", "me/new"]) == 0
    assert [c[0] for c in fake_hub.calls] == ["create_repo", "upload_large_folder", "upload_file"]
    assert fake_hub.calls[-1] == ("upload_file", "README.md", "me/new", "---")
    assert _snapshot(without_card) == before


@pytest.mark.parametrize(
    "repo",
    ["me/a..b", "me/a--b", "me/name.", "me/-name", "me/x.git", "me/" + "a" * 97, "a/b/c", "me", "me/ná", "me/a b"],
)
def test_a_malformed_repo_id_is_one_line_also_in_a_dry_run(saved, repo):
    assert_one_line_error(run_cli("upload", str(saved), "--repo", repo, "--dry-run"), "is not a Hub repo id")


@pytest.mark.parametrize(
    "log, message",
    [
        ('{"source_model": "x", "parameters": {"seed', "not readable JSON"),  # cut short
        ("[1, 2]", "holds list"),
        (b"\xff\xfe{}", "not readable JSON"),
        ('{"parameters": 5}', "not a log written by mlx-abliterate"),
        ('{"quantized_output": {"bits": 4}}', "not a log written by mlx-abliterate"),
    ],
)
def test_a_broken_log_is_one_line(saved, tmp_path, log, message):
    import shutil

    folder = tmp_path / "broken"
    shutil.copytree(saved, folder)
    (folder / "README.md").unlink()
    path = folder / "abliteration_log.json"
    path.write_bytes(log if isinstance(log, bytes) else log.encode())
    before = _snapshot(folder)
    assert_one_line_error(run_cli("upload", str(folder), "--repo", "me/x", "--dry-run"), message)
    assert _snapshot(folder) == before
