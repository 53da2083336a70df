"""resolve_asset: local paths, .gguf conversion, hub ids and every hub failure (no network)."""

from __future__ import annotations

import huggingface_hub
import pytest
from huggingface_hub import errors as hub_errors

# The HTTP client huggingface_hub raises with (httpx2 in hub 1.x+).
httpx = pytest.importorskip(hub_errors.Response.__module__.split(".")[0])

from mlx_abliteration.io.asset_resolver import (  # noqa: E402  (after the importorskip)
    MODEL_FILE_PATTERNS,
    is_hub_id,
    resolve_asset,
)
from tests.support.patching import patch_everywhere  # noqa: E402


def _http_error(cls, status: int):
    request = httpx.Request("GET", "https://huggingface.co/api/models/owner/name")
    return cls(f"{status} error", response=httpx.Response(status, request=request))


def _hub_raises(monkeypatch, error: Exception) -> None:
    def fake(*args, **kwargs):
        raise error

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)


def _no_network(monkeypatch) -> None:
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *a, **k: pytest.fail("network used"))


def test_existing_local_directory_is_returned_absolute(tmp_path, monkeypatch):
    _no_network(monkeypatch)
    model = tmp_path / "model"
    model.mkdir()
    monkeypatch.chdir(tmp_path)
    assert resolve_asset("model") == model.resolve()
    assert resolve_asset(model) == model.resolve()


def test_local_path_shaped_like_a_hub_id_wins(tmp_path, monkeypatch):
    _no_network(monkeypatch)
    (tmp_path / "owner" / "name").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert resolve_asset("owner/name") == (tmp_path / "owner" / "name").resolve()


@pytest.mark.parametrize("text", ["./missing-model", "/no/such/dir", "~/no-such-model-dir", "missing", "a/b/c", ""])
def test_missing_non_hub_path_fails_without_network(text, monkeypatch):
    _no_network(monkeypatch)
    with pytest.raises(FileNotFoundError) as info:
        resolve_asset(text)
    message = str(info.value)
    assert "\n" not in message
    assert ("no such local path" in message and "not a Hugging Face id" in message) or "no path given" in message


def test_hub_id_shape():
    assert is_hub_id("Qwen/Qwen2.5-Coder-1.5B-Instruct")
    assert is_hub_id("mlx-community/SmolLM2-135M-Instruct-4bit")
    for text in ("./a/b", "../a", "a/b/c", "~/x", "a/../b", "a--b/c", "/abs/x", "name"):
        assert not is_hub_id(text), text


def test_hub_id_downloads_model_files_into_cache_dir(tmp_path, monkeypatch):
    snapshot = tmp_path / "snap"
    snapshot.mkdir()
    (snapshot / "config.json").write_text("{}")
    calls = []

    def fake(repo_id, **kwargs):
        calls.append((repo_id, kwargs))
        return str(snapshot)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    monkeypatch.chdir(tmp_path)
    assert resolve_asset("owner/model", cache_dir=tmp_path / "cache") == snapshot
    repo_id, kwargs = calls[0]
    assert repo_id == "owner/model"
    assert kwargs == {"repo_type": "model", "cache_dir": tmp_path / "cache", "allow_patterns": MODEL_FILE_PATTERNS}


def test_dataset_repo_type_downloads_everything(tmp_path, monkeypatch):
    (tmp_path / "snap").mkdir()
    (tmp_path / "snap" / "data.parquet").write_bytes(b"x")
    seen = {}
    monkeypatch.setattr(
        huggingface_hub, "snapshot_download", lambda repo_id, **k: seen.update(k) or str(tmp_path / "snap")
    )
    monkeypatch.chdir(tmp_path)
    resolve_asset("owner/data", repo_type="dataset")
    assert seen["repo_type"] == "dataset" and seen["allow_patterns"] is None


def test_empty_snapshot_is_reported(tmp_path, monkeypatch):
    (tmp_path / "snap").mkdir()
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *a, **k: str(tmp_path / "snap"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="has no usable files"):
        resolve_asset("owner/pytorch-only")


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (
            hub_errors.LocalEntryNotFoundError("not in cache"),
            "the Hub is unreachable (offline?) and the repo is not in cache",
        ),
        (hub_errors.OfflineModeIsEnabled("HF_HUB_OFFLINE=1"), "the Hub is unreachable (offline?)"),
        (_http_error(hub_errors.RepositoryNotFoundError, 404), "the repo does not exist or is private"),
        (
            _http_error(hub_errors.GatedRepoError, 403),
            "it is gated; accept its terms at https://huggingface.co/owner/model",
        ),
        (_http_error(hub_errors.HfHubHTTPError, 503), "the Hub answered HTTP 503; retry later"),
        (httpx.ConnectError("[Errno -3] Temporary failure in name resolution"), "the download failed (ConnectError"),
    ],
)
def test_hub_failures_become_file_not_found_with_what_was_tried(error, expected, tmp_path, monkeypatch):
    _hub_raises(monkeypatch, error)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError) as info:
        resolve_asset("owner/model", cache_dir=tmp_path / "cache")
    message = str(info.value)
    assert message.startswith(
        f"no local path {tmp_path / 'owner' / 'model'}, so tried Hugging Face model repo owner/model: "
    )
    assert expected in message
    assert "pass a local path" in message and "\n" not in message


def test_gguf_file_is_converted_with_the_cache_dir(tmp_path, monkeypatch):
    from mlx_abliteration.io import gguf

    source = tmp_path / "Model.Q4_K_M.GGUF"
    source.write_bytes(b"GGUF")
    converted = tmp_path / "converted"
    calls = []
    patch_everywhere(
        monkeypatch, gguf, "convert_gguf_cached", lambda path, cache_dir: calls.append((path, cache_dir)) or converted
    )
    assert resolve_asset(str(source), cache_dir=tmp_path / "cache") == converted
    assert calls == [(source, tmp_path / "cache")]


def test_missing_gguf_file_is_reported_without_network(tmp_path, monkeypatch):
    _no_network(monkeypatch)
    with pytest.raises(FileNotFoundError, match=r"GGUF file .*missing\.gguf not found"):
        resolve_asset(tmp_path / "missing.gguf")
