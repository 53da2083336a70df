"""Prompt sets: packaged defaults, local files and Hugging Face datasets.

Sources (``load_prompts``):

- ``None``: the packaged default set for ``kind`` ("harmful" or "harmless").
- ``.jsonl``: one JSON object (or string) per line; the prompt is the first
  of ``prompt``, ``text``, ``instruction``, or the first user turn of
  ``messages``; ``column`` picks another field.
- ``.json``: a list of strings or of such objects.
- ``.csv``: column ``column``, else the first of prompt/text/instruction.
- ``.txt``: one prompt per line.
- ``.parquet``: like ``.csv`` (needs pyarrow).
- a directory: every data file in it (jsonl, parquet, csv; else json, txt).
- ``owner/name``: a Hugging Face dataset, downloaded into ``cache_dir`` and
  read like a directory.

Prompts are stripped, empty ones dropped and duplicates removed (first kept),
so a train/eval split can never put the same prompt on both sides.
"""

from __future__ import annotations

import csv
import json
import random
from collections.abc import Iterable, Iterator
from importlib import resources
from pathlib import Path

from mlx_abliteration.errors import UserError
from mlx_abliteration.io.asset_resolver import hub_snapshot, is_hub_id, is_timeout, timeout_message

KINDS = ("harmful", "harmless")
PROMPT_FIELDS = ("prompt", "text", "instruction")
MESSAGES_FIELD = "messages"
SUFFIXES = (".jsonl", ".json", ".csv", ".txt", ".parquet")
# Preferred data files in a directory; json/txt are often metadata, read only as a last resort.
PRIMARY_SUFFIXES = (".jsonl", ".parquet", ".csv")

Record = tuple[str, object]  # (location for messages, str or dict)


def default_dataset_path(kind: str) -> Path:
    """The packaged default prompt set for ``kind``."""
    if kind not in KINDS:
        raise UserError(f"unknown dataset kind {kind!r}; use 'harmful' or 'harmless'")
    return Path(str(resources.files("mlx_abliteration") / "data" / f"{kind}_dataset.jsonl"))


def load_prompts(
    source: str | Path | None,
    kind: str,
    cache_dir: Path | None = None,
    column: str | None = None,
) -> list[str]:
    """Prompts from ``source`` (see the module docstring); errors are one-line ``UserError``s.

    Every unique prompt is held in memory: for a large file that only a few prompts are taken
    from, ``data.prompt_selection`` streams it instead (same prompts, memory bounded).
    """
    files, label = prompt_files(source, kind, cache_dir)
    prompts = _unique(iter_prompts(files, column))  # unique, in first-seen order
    if not prompts:
        raise no_prompts(label)
    return prompts


def prompt_files(source: str | Path | None, kind: str, cache_dir: Path | None = None) -> tuple[list[Path], str]:
    """The data files a dataset source reads (a hub id is downloaded first) and its label for messages."""
    if source is None or str(source) == "":
        return [default_dataset_path(kind)], f"default {kind} dataset"
    path = Path(source).expanduser()
    text = str(source)
    if not path.exists():
        if path.suffix.lower() in SUFFIXES or not is_hub_id(text):
            raise UserError(
                f"{kind} dataset {text} not found; pass an existing file or a Hugging Face dataset id (owner/name)"
            )
        path = _download_dataset(text, cache_dir, kind)
    return (_data_files(path) if path.is_dir() else [path]), text


def iter_prompts(files: list[Path], column: str | None = None) -> Iterator[str]:
    """Every non-empty prompt of ``files``, stripped, duplicates included, streamed record by record."""
    for file in files:
        yield from _prompts_from_records(_read_records(file, column), column, file)


def no_prompts(label: str) -> UserError:
    return UserError(f"dataset {label} has no prompts; add prompts or pass another dataset")


def _data_files(directory: Path) -> list[Path]:
    files = sorted(p for p in directory.rglob("*") if p.is_file() and not _hidden(p, directory))
    for suffixes in (PRIMARY_SUFFIXES, (".json", ".txt")):
        chosen = [p for p in files if p.suffix.lower() in suffixes]
        if chosen:
            return chosen
    raise UserError(f"{directory} contains no data files ({', '.join(SUFFIXES)}); pass a file instead")


def _hidden(path: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def _unique(prompts: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(prompts))


# --- readers: each yields (location, record) -----------------------------------


def _read_records(path: Path, column: str | None = None) -> Iterator[Record]:
    """Stream the records of ``path``: memory is one record (plus a JSON/CSV row), not the file."""
    readers = {
        ".jsonl": _read_jsonl,
        ".json": _read_json,
        ".csv": _read_csv,
        ".txt": _read_txt,
        ".parquet": _read_parquet,
    }
    reader = readers.get(path.suffix.lower())
    if reader is None:
        raise UserError(f"{path}: unsupported file type {path.suffix or '(none)'}; use one of {', '.join(SUFFIXES)}")
    try:
        yield from (_read_parquet(path, column) if reader is _read_parquet else reader(path))
    except UnicodeDecodeError:
        raise UserError(f"{path} is not UTF-8 text; convert it to UTF-8") from None
    except IsADirectoryError:
        raise UserError(f"{path} is a directory, not a {path.suffix} file; pass the file") from None
    except OSError as err:
        raise UserError(f"cannot read {path} ({err.strerror or err}); check the path and its permissions") from None


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    with path.open(encoding="utf-8-sig") as stream:
        for number, line in enumerate(stream, start=1):
            yield number, line.rstrip("\r\n")


def _read_jsonl(path: Path) -> Iterator[Record]:
    for number, line in _lines(path):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise UserError(f"{path} line {number}: malformed JSON ({err.msg}); fix or remove that line") from None
        yield f"line {number}", record


def _read_json(path: Path) -> Iterator[Record]:
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))  # one JSON document: parsed whole
    except json.JSONDecodeError as err:
        raise UserError(f"{path} line {err.lineno}: malformed JSON ({err.msg}); fix the file") from None
    if not isinstance(data, list):
        raise UserError(
            f"{path}: expected a JSON list of prompts or objects, got {type(data).__name__}; wrap them in a list"
        )
    for index in range(len(data)):
        item, data[index] = data[index], None  # let each object go once its prompt is taken
        yield f"item {index}", item


def _read_csv(path: Path) -> Iterator[Record]:
    with path.open(encoding="utf-8-sig", newline="") as stream:
        rows = csv.DictReader(stream)
        index = 0
        try:
            for index, row in enumerate(rows):
                # Data starts on line 2, after the header row.
                yield f"line {index + 2}", row
        except csv.Error as err:
            raise UserError(f"{path}: malformed CSV ({err}); fix the file") from None


def _read_txt(path: Path) -> Iterator[Record]:
    for number, line in _lines(path):
        yield f"line {number}", line


def _read_parquet(path: Path, column: str | None = None) -> Iterator[Record]:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ModuleNotFoundError as err:
        if err.name not in ("pyarrow", "pyarrow.parquet"):
            raise
        raise UserError(
            f"{path}: reading Parquet datasets needs pyarrow; install it with: pip install 'mlx-abliteration[parquet]'"
        ) from err

    try:
        table = pq.ParquetFile(path)
        names = table.schema_arrow.names
        # Only the column that holds the prompt is read; all of them when it must be reported missing.
        wanted = [column] if column else [f for f in PROMPT_FIELDS + (MESSAGES_FIELD,) if f in names]
        columns = wanted if wanted and all(c in names for c in wanted) else None
        number = 0
        for batch in table.iter_batches(batch_size=1024, columns=columns):
            for row in batch.to_pylist():
                number += 1
                yield f"row {number}", row
    except (pa.ArrowException, OSError) as err:
        raise UserError(f"{path}: unreadable Parquet file ({err}); check that it is complete") from None


# --- records -> prompts ---------------------------------------------------------


def _prompts_from_records(records: Iterator[Record], column: str | None, path: Path) -> Iterator[str]:
    for location, record in records:
        prompt = _prompt_of(record, column, f"{path} {location}")
        if prompt and prompt.strip():
            yield prompt.strip()


def _prompt_of(record: object, column: str | None, where: str) -> str | None:
    if isinstance(record, str):
        return record
    if not isinstance(record, dict):
        raise UserError(f"{where}: expected a string or an object, got {type(record).__name__}; one prompt per record")
    if column is not None:
        if column not in record:
            raise UserError(f"{where}: no field {column!r} (found: {_field_list(record)}); choose one of those columns")
        return _as_text(record[column], where, column)
    for field in PROMPT_FIELDS:
        if record.get(field) is not None:
            return _as_text(record[field], where, field)
    if record.get(MESSAGES_FIELD) is not None:
        return _first_user_turn(record[MESSAGES_FIELD], where)
    raise UserError(
        f"{where}: no usable field (found: {_field_list(record)}); "
        f"name the prompt field one of {', '.join(PROMPT_FIELDS + (MESSAGES_FIELD,))} or choose a column"
    )


def _field_list(record: dict) -> str:
    return ", ".join(map(str, record)) or "none"


def _as_text(value: object, where: str, field: str) -> str:
    if isinstance(value, str):
        return value
    if field == MESSAGES_FIELD or isinstance(value, list):
        return _first_user_turn(value, where)
    raise UserError(f"{where}: field {field!r} holds {type(value).__name__}, not text; choose a text column")


def _first_user_turn(messages: object, where: str) -> str:
    if isinstance(messages, list):
        for message in messages:
            if isinstance(message, dict) and message.get("role") == "user":
                return _message_text(message.get("content"))
    raise UserError(
        f"{where}: 'messages' has no user turn; give each record a {{'role': 'user', 'content': ...}} message"
    )


def _message_text(content: object) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # multimodal parts: [{"type": "text", "text": ...}, ...]
        return " ".join(
            part.get("text", "") for part in content if isinstance(part, dict) and part.get("type") == "text"
        )
    return ""


# --- Hugging Face Hub -----------------------------------------------------------


def _download_dataset(repo_id: str, cache_dir: Path | None, kind: str) -> Path:
    patterns = [f"*{suffix}" for suffix in SUFFIXES]
    try:
        return Path(hub_snapshot(repo_id, "dataset", cache_dir, patterns))
    except Exception as err:  # network, auth, missing repo: all end the same way for the user
        raise UserError(
            f"{kind} dataset {repo_id}: no such local path, and the Hugging Face dataset could not be fetched "
            f"({_hub_reason(err)}); check the id and your connection, or pass a local file"
        ) from None


def _hub_reason(err: Exception) -> str:
    from huggingface_hub import errors

    if is_timeout(err):
        return str(err) if isinstance(err, TimeoutError) and str(err) else timeout_message()
    if isinstance(err, errors.GatedRepoError):
        return "gated: accept its terms and log in with `hf auth login`"
    if isinstance(err, errors.RepositoryNotFoundError):
        return "not found, or private without a token"
    if isinstance(err, (errors.LocalEntryNotFoundError, errors.OfflineModeIsEnabled)):
        return "offline and not in the cache"
    return f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else 'no details'}"


# --- train/eval split -------------------------------------------------------------


def split_prompts(
    prompts: list[str],
    n_train: int | None,
    n_eval: int,
    seed: int,
    name: str = "",
) -> tuple[list[str], list[str]]:
    """Shuffle with ``seed`` and cut disjoint train and eval lists.

    Eval prompts are cut first, so the eval set does not change with
    ``n_train``; ``n_train=None`` takes every prompt left after them.
    """
    unique = _unique(prompts)
    check_split(len(unique), n_train, n_eval, name)
    shuffled = unique[:]
    random.Random(seed).shuffle(shuffled)
    eval_prompts = shuffled[:n_eval]
    rest = shuffled[n_eval:]
    train = rest if n_train is None else rest[:n_train]
    return train, eval_prompts


def check_split(count: int, n_train: int | None, n_eval: int, name: str = "") -> None:
    """A split of ``count`` unique prompts into ``n_train`` (None: all the rest) and ``n_eval`` is possible."""
    if n_eval < 0 or (n_train is not None and n_train < 0):
        raise UserError(f"prompt counts must not be negative (train {n_train}, eval {n_eval})")
    wanted = (n_train if n_train is not None else 1) + n_eval
    if count < wanted:
        label = f"dataset {name}" if name else "the dataset"
        requested = f"{n_train}+{n_eval}" if n_train is not None else f"at least 1+{n_eval}"
        raise UserError(
            f"{label} has {count} prompts but {requested} were requested; lower --max-prompts/--eval-size or add prompts"
        )


PROMPT_KINDS = ("harmful", "harmless")
