"""The prompts a run takes from a dataset, streamed: memory bounded by the prompts taken, not the file.

``split_prompts(load_prompts(...))`` holds every unique prompt (a 200 MB JSONL
file used for 3 prompts peaked at 832 MB). The split shuffles *all* unique
prompts (``random.Random(seed).shuffle``), so which prompts are taken depends on
how many there are: the same prompts are found here in two streamed passes.

1. Every prompt's 64-bit hash, in file order (8 bytes a prompt): the first
   occurrence of each hash is a unique prompt, so their count is known.
2. The same shuffle, of the unique prompts' *positions* (the shuffle depends
   only on the length), names the positions taken; a second pass keeps only
   their texts.

The contents' digests (``abliteration_log.json``'s ``prompts_sha256``, a study's
prompt fingerprint) are streamed the same way, equal to hashing ``json.dumps``
of the whole list.
"""

from __future__ import annotations

import hashlib
import json
import random
from array import array
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from mlx_abliteration.data.datasets import PROMPT_KINDS, check_split, iter_prompts, no_prompts, prompt_files

if TYPE_CHECKING:
    from mlx_abliteration.config.defaults import AbliterationConfig


def _hash64(prompt: str) -> int:
    return int.from_bytes(hashlib.blake2b(prompt.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little")


@dataclass
class PromptScan:
    """A dataset's files and which of its prompts are first occurrences (unique), after one streamed pass."""

    files: list[Path]
    column: str | None
    label: str
    first: np.ndarray  # bool per prompt in file order: a unique prompt's first occurrence

    @property
    def count(self) -> int:
        return int(self.first.sum())

    def unique(self) -> Iterator[str]:
        """The unique prompts in first-seen order (as ``load_prompts`` lists them), streamed."""
        first = self.first
        for index, prompt in enumerate(iter_prompts(self.files, self.column)):
            if index < len(first) and first[index]:
                yield prompt

    def split(
        self, n_train: int | None, n_eval: int, seed: int, name: str = "", take: int | None = None
    ) -> tuple[list[str], list[str]]:
        """``split_prompts(load_prompts(...), n_train, n_eval, seed, name)``, reading only the prompts taken.

        ``take`` caps the train list when ``n_train`` is None (all the rest): only its first ``take`` are read.
        """
        count = self.count
        check_split(count, n_train, n_eval, name)
        order = array("Q", range(count))
        random.Random(seed).shuffle(order)  # the same swaps as shuffling the prompts themselves
        n_rest = count - n_eval if n_train is None else n_train
        n_rest = n_rest if take is None else min(n_rest, take)
        wanted = {position: slot for slot, position in enumerate(order[: n_eval + n_rest])}
        del order
        texts: list[str] = [""] * len(wanted)
        for position, prompt in enumerate(self.unique()):
            slot = wanted.get(position)
            if slot is not None:
                texts[slot] = prompt
        return texts[n_eval:], texts[:n_eval]

    def feed(self, sha: Any, ensure_ascii: bool = True) -> None:  # a hashlib object
        """``sha.update(json.dumps(load_prompts(...), ensure_ascii=...).encode())``, streamed."""
        sha.update(b"[")
        for position, prompt in enumerate(self.unique()):
            if position:
                sha.update(b", ")
            sha.update(json.dumps(prompt, ensure_ascii=ensure_ascii).encode())
        sha.update(b"]")

    def digest(self, ensure_ascii: bool = True) -> str:
        """SHA256 of ``json.dumps(load_prompts(...), ensure_ascii=...)``, streamed."""
        sha = hashlib.sha256()
        self.feed(sha, ensure_ascii)
        return sha.hexdigest()


def scan_prompts(
    source: str | Path | None, kind: str, cache_dir: Path | None = None, column: str | None = None
) -> PromptScan:
    """One streamed pass over a dataset (``load_prompts``'s sources and errors)."""
    files, label = prompt_files(source, kind, cache_dir)
    hashes = array("Q", (_hash64(prompt) for prompt in iter_prompts(files, column)))
    values = np.frombuffer(hashes, dtype=np.uint64) if hashes else np.zeros(0, dtype=np.uint64)
    first = np.zeros(len(values), dtype=bool)
    first[np.unique(values, return_index=True)[1]] = True
    if not first.any():
        raise no_prompts(label)
    return PromptScan(files, column, label, first)


def select_prompts(
    source: str | Path | None,
    kind: str,
    n_train: int | None,
    n_eval: int,
    seed: int,
    cache_dir: Path | None = None,
    column: str | None = None,
    name: str = "",
) -> tuple[list[str], list[str]]:
    """``split_prompts(load_prompts(source, ...), n_train, n_eval, seed, name)`` with memory bounded (module doc)."""
    return scan_prompts(source, kind, cache_dir, column).split(n_train, n_eval, seed, name)


def prompt_digests(config: AbliterationConfig) -> dict[str, str]:
    """SHA256 of each prompt set's contents as loaded (every prompt, before the split)."""
    cache = Path(config.cache_dir) if config.cache_dir else None
    return {
        kind: scan_prompts(getattr(config, f"{kind}_dataset"), kind, cache, config.dataset_column).digest(
            ensure_ascii=False
        )
        for kind in PROMPT_KINDS
    }
