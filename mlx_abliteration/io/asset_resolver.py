"""Turn what the user typed (local path, ``.gguf`` file, Hugging Face id) into a local path.

Every failure is a ``FileNotFoundError`` whose message says what was tried
and how to fix it; the CLI prints it as one line.
"""

from __future__ import annotations

from pathlib import Path

from mlx_abliteration.io.gguf import convert_gguf_cached
from mlx_abliteration.runtime.hub_env import hub_timeout

# Files mlx-lm needs to load a model; skips PyTorch/.bin/GGUF duplicates of the weights.
# What mlx-lm loads: only model*.safetensors weights (never consolidated.safetensors or original/ copies).
MODEL_FILE_PATTERNS = ["*.json", "model*.safetensors", "*.txt", "*.model", "*.tiktoken", "*.jinja", "*.py"]
HUB_URL = "https://huggingface.co"


def is_hub_id(text: object) -> bool:
    """``owner/name`` by the Hub's own rules (``huggingface_hub.utils.validate_repo_id``: letters, digits, -_. ,
    at most 96 characters a part, no ``--`` or ``..``, no leading or trailing ``-``/``.``): never path syntax such
    as ./, ~ or ..; the one check of a Hub id (models, datasets, ``upload --repo``, a card's ``base_model``)."""
    if not isinstance(text, str) or text.count("/") != 1:
        return False
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(text)
    except ValueError:  # HFValidationError
        return False
    return True


def resolve_asset(
    path_or_id: str | Path,
    cache_dir: Path | None = None,
    repo_type: str = "model",
    allow_patterns: list[str] | None = None,
) -> Path:
    """A local path for ``path_or_id``.

    - an existing path is returned as is (absolute);
    - a ``.gguf`` file is converted once to an MLX model dir (cached in ``cache_dir``);
    - ``owner/name`` is downloaded with ``huggingface_hub.snapshot_download``
      into ``cache_dir`` (model repos: only the files mlx-lm loads, unless
      ``allow_patterns`` says otherwise).
    """
    text = str(path_or_id).strip()
    if not text:
        raise FileNotFoundError("no path given; pass a local directory, a .gguf file or a Hugging Face id (owner/name)")
    path = Path(text).expanduser()
    if text.lower().endswith(".gguf"):
        return _resolve_gguf(path, cache_dir)
    if path.exists():
        return path.resolve()
    if not is_hub_id(text):
        raise FileNotFoundError(
            f"{text}: no such local path ({path.absolute()}), and it is not a Hugging Face id of the form owner/name; "
            "check the path"
        )
    if allow_patterns is None and repo_type == "model":
        allow_patterns = MODEL_FILE_PATTERNS
    return _download(text, path, cache_dir, repo_type, allow_patterns)


def _resolve_gguf(path: Path, cache_dir: Path | None) -> Path:
    if not path.is_file():
        raise FileNotFoundError(
            f"GGUF file {path.absolute()} not found; check the path (download it first if it lives on the Hub)"
        )

    return convert_gguf_cached(path, cache_dir)


def hub_snapshot(repo_id: str, repo_type: str, cache_dir: Path | None, allow_patterns: list[str] | None) -> str:
    """``snapshot_download`` that cannot hang on a server that accepts and never answers.

    Its metadata call (``repo_info``) is made without any timeout, so a silent
    server stalled it for minutes. The same call is made first here with
    ``hub_timeout()``; when it times out, a cached snapshot is used if there
    is one, else a ``TimeoutError`` naming the endpoint is raised. Other
    failures are left to ``snapshot_download`` (it knows offline/cache rules).
    File downloads keep their own ``HF_HUB_DOWNLOAD_TIMEOUT``.
    """
    from huggingface_hub import HfApi, constants, snapshot_download

    if not constants.HF_HUB_OFFLINE:
        try:
            HfApi().repo_info(repo_id, repo_type=repo_type, timeout=hub_timeout())
        except Exception as err:
            if is_timeout(err):  # other failures: snapshot_download reports them or uses the cache
                try:
                    return snapshot_download(
                        repo_id,
                        repo_type=repo_type,
                        cache_dir=cache_dir,
                        allow_patterns=allow_patterns,
                        local_files_only=True,
                    )
                except Exception:
                    raise TimeoutError(timeout_message()) from None
    return snapshot_download(repo_id, repo_type=repo_type, cache_dir=cache_dir, allow_patterns=allow_patterns)


def is_timeout(err: BaseException) -> bool:
    """True for a connect/read timeout from any HTTP stack, however it was wrapped."""
    seen = set()
    link: BaseException | None = err
    while link is not None and id(link) not in seen:
        seen.add(id(link))
        if isinstance(link, TimeoutError) or "Timeout" in type(link).__name__:
            return True
        link = link.__cause__ or link.__context__
    return False


def timeout_message() -> str:
    from huggingface_hub import constants

    return (
        f"the Hub at {constants.ENDPOINT} did not answer within {hub_timeout():g} s "
        "(set HF_HUB_ETAG_TIMEOUT to wait longer, check HF_ENDPOINT and your connection, or set HF_HUB_OFFLINE=1)"
    )


def _download(
    repo_id: str, local: Path, cache_dir: Path | None, repo_type: str, allow_patterns: list[str] | None
) -> Path:
    tried = f"no local path {local.absolute()}, so tried Hugging Face {repo_type} repo {repo_id}"
    try:
        snapshot = hub_snapshot(repo_id, repo_type, cache_dir, allow_patterns)
    except Exception as err:  # offline, missing, gated, HTTP: each becomes one actionable line
        raise FileNotFoundError(f"{tried}: {_hub_failure(err, repo_id, cache_dir)}") from None
    snapshot_dir = Path(snapshot)
    if not any(p.is_file() for p in snapshot_dir.rglob("*")):
        raise FileNotFoundError(
            f"{tried}: it has no usable files ({', '.join(allow_patterns or ['*'])}); pass a local path"
        )
    return snapshot_dir


def _hub_failure(err: Exception, repo_id: str, cache_dir: Path | None) -> str:
    from huggingface_hub import errors

    cache = f"cache {cache_dir}" if cache_dir else "the default Hugging Face cache"
    if is_timeout(err):
        return f"{_first_line(err) if isinstance(err, TimeoutError) else timeout_message()}; or pass a local path"
    if isinstance(err, errors.GatedRepoError):
        return f"it is gated; accept its terms at {HUB_URL}/{repo_id} and log in (`hf auth login` or HF_TOKEN), or pass a local path"
    if isinstance(err, errors.RepositoryNotFoundError):
        return (
            "the repo does not exist or is private; check the spelling, log in for private repos, or pass a local path"
        )
    if isinstance(err, errors.RevisionNotFoundError):
        return "the revision does not exist; check the id or pass a local path"
    if isinstance(err, (errors.LocalEntryNotFoundError, errors.OfflineModeIsEnabled)):
        return (
            f"the Hub is unreachable (offline?) and the repo is not in {cache}; pass a local path or connect and retry"
        )
    if isinstance(err, errors.HfHubHTTPError):
        status = getattr(getattr(err, "response", None), "status_code", "?")
        return f"the Hub answered HTTP {status}; retry later or pass a local path"
    return f"the download failed ({type(err).__name__}: {_first_line(err)}); check your connection or pass a local path"


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else "no details"
