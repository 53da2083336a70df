"""Upload a saved abliterated model (or adapter) folder to the Hugging Face Hub.

``huggingface_hub``: ``create_repo`` then ``upload_large_folder`` (resumable,
many files in parallel; where the installed huggingface_hub has no such method
— 2.x removed it — ``upload_folder``). The folder is only read: a card made
from its log (when it has no README.md) is uploaded from memory. The token comes from the usual places
(``HF_TOKEN``, ``huggingface-cli login``'s stored token) via
``huggingface_hub.get_token``. Failures the user can fix are one line: no
token, no network (or ``HF_HUB_OFFLINE``), a rejected token, an existing repo
without ``--overwrite``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from mlx_abliteration.errors import UserError
from mlx_abliteration.export.model_card import model_card
from mlx_abliteration.io.asset_resolver import is_hub_id

T = TypeVar("T")

CARD = "README.md"
LOG = "abliteration_log.json"
# Never uploaded: temp/partial dirs of our atomic writes, upload caches, OS litter.
IGNORED = (".cache/**", ".*", "**/.DS_Store")


@dataclass
class UploadPlan:
    folder: Path
    repo: str
    private: bool
    files: list[tuple[str, int]] = field(default_factory=list)  # (relative path, bytes)
    card: str = ""
    card_from_log: bool = False  # the folder has no README.md: the card made from the log is uploaded from memory

    @property
    def total_bytes(self) -> int:
        return sum(size for _, size in self.files)

    def describe(self) -> str:
        lines = [
            f"would upload {len(self.files)} files ({self.total_bytes / 1e6:.1f} MB) from {self.folder} to "
            f"{'private ' if self.private else ''}model repo {self.repo}:"
        ]
        lines += [f"  {name}  {size / 1e6:.2f} MB" for name, size in self.files]
        lines += ["", f"--- {CARD} ---", self.card]
        return "\n".join(lines)


def check_repo_id(repo: str) -> str:
    """``USER/NAME`` by the Hub's own rules (``io.asset_resolver.is_hub_id``), checked before any work or dry run."""
    if not isinstance(repo, str) or not is_hub_id(repo):
        raise UserError(
            f"--repo {repo!r} is not a Hub repo id: give USER/NAME (or ORG/NAME), each of letters, digits, "
            "'-', '_' and '.', at most 96 characters, no '--' or '..', not starting or ending with '-' or '.'"
        )
    return repo


def read_log(folder: Path) -> dict:
    """The folder's ``abliteration_log.json`` as a dict (an untrusted file: a one-line error if it is not one)."""
    path = folder / LOG
    try:
        record = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise UserError(
            f"{path} is not readable JSON ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); "
            "upload a complete output dir of `mlx-abliterate run`, `ablate` or `export-adapter`"
        ) from err
    if not isinstance(record, dict):
        raise UserError(f"{path} holds {type(record).__name__}, not a log written by mlx-abliterate")
    return record


def plan_upload(folder: str | Path, repo: str, private: bool = False) -> UploadPlan:
    """The files and card an upload would send; writes nothing (a folder without a card gets one made from its
    log, sent from memory)."""
    folder = Path(folder)
    check_repo_id(repo)
    if not folder.is_dir():
        raise UserError(f"{folder} is not a folder; pass the output dir of `mlx-abliterate run` (or an adapter dir)")
    if not (folder / LOG).is_file():
        raise UserError(
            f"{folder} has no {LOG}; upload the output dir of `mlx-abliterate run`, `ablate` or `export-adapter`"
        )
    record = read_log(folder)
    files = sorted(
        (str(p.relative_to(folder)), p.stat().st_size)
        for p in folder.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )
    card = folder / CARD
    if card.is_file():
        return UploadPlan(folder, repo, private, files, card.read_text(errors="replace"))
    try:
        text = model_card(record, adapter=record.get("adapter"))
    except (AttributeError, KeyError, TypeError, ValueError) as err:
        raise UserError(
            f"{folder / LOG} is not a log written by mlx-abliterate ({type(err).__name__}: {err}); "
            f"cannot write its model card: add a {CARD} to the folder"
        ) from err
    files = sorted([*files, (CARD, len(text.encode()))])
    return UploadPlan(folder, repo, private, files, text, card_from_log=True)


def get_token() -> str:
    from huggingface_hub import get_token as hub_token

    token = hub_token()
    if not token:
        raise UserError("no Hugging Face token: run `huggingface-cli login` (or `hf auth login`) or set HF_TOKEN")
    return token


def _is_network_error(err: BaseException) -> bool:
    from huggingface_hub.errors import OfflineModeIsEnabled

    if isinstance(err, (OfflineModeIsEnabled, ConnectionError, TimeoutError)):
        return True
    kind = type(err)
    module = kind.__module__.split(".")[0]
    return module in ("httpx", "httpcore", "requests", "urllib3") and any(
        w in kind.__name__ for w in ("Connect", "Timeout", "Network", "Proxy")
    )


def _status(err: BaseException) -> int | None:
    response = getattr(err, "response", None)
    return getattr(response, "status_code", None)


def _hub_call(what: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run one Hub call; what the user can fix becomes one line."""
    try:
        return fn(*args, **kwargs)
    except UserError:
        raise
    except Exception as err:
        if _is_network_error(err):
            raise UserError(
                f"cannot reach the Hugging Face Hub to {what} ({type(err).__name__}); check the network (and HF_HUB_OFFLINE)"
            ) from err
        status = _status(err)
        if status == 401:
            raise UserError(
                f"the Hugging Face token was rejected when trying to {what}; log in again (`huggingface-cli login`)"
            ) from err
        if status == 403:
            raise UserError(
                f"the Hugging Face token may not {what}; it needs write access to the repo's namespace"
            ) from err
        raise


def upload(
    folder: str | Path,
    repo: str,
    *,
    private: bool = False,
    overwrite: bool = False,
    dry_run: bool = False,
    api: Any = None,
    progress: Callable[[int, int, str], None] | None = None,
) -> UploadPlan:
    """Create ``repo`` and upload ``folder`` into it (``dry_run``: only the plan, no token or network needed)."""
    plan = plan_upload(folder, repo, private)
    if dry_run:
        return plan
    token = get_token()
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi(token=token)
    exists = _hub_call(f"look up {repo}", api.repo_exists, repo, repo_type="model")
    if exists and not overwrite:
        raise UserError(
            f"the Hub repo {repo} already exists; pass --overwrite to upload into it (files of the same name are replaced)"
        )
    _hub_call(f"create {repo}", api.create_repo, repo, private=private, repo_type="model", exist_ok=True)
    if progress:
        progress(0, 1, "upload")
    large = getattr(api, "upload_large_folder", None)
    if large is not None:
        _hub_call(
            f"upload to {repo}",
            large,
            repo_id=repo,
            folder_path=str(plan.folder),
            repo_type="model",
            private=private,
            ignore_patterns=list(IGNORED),
        )
    else:
        _hub_call(
            f"upload to {repo}",
            api.upload_folder,
            repo_id=repo,
            folder_path=str(plan.folder),
            repo_type="model",
            ignore_patterns=list(IGNORED),
            commit_message="Upload abliterated model (mlx-abliteration)",
        )
    if plan.card_from_log:  # the user's folder is never written: the card goes from memory
        _hub_call(
            f"upload the model card to {repo}",
            api.upload_file,
            path_or_fileobj=plan.card.encode(),
            path_in_repo=CARD,
            repo_id=repo,
            repo_type="model",
            commit_message="Model card (mlx-abliteration)",
        )
    if progress:
        progress(1, 1, "upload")
    return plan
