"""Template-driven generator of paired harmful/harmless prompt sets.

A template file is YAML::

    version: 1                      # optional, must be 1
    generation_config:              # optional defaults; command-line flags win
      num_samples: 400              # prompts per kind (= pairs)
      seed: 1234
      output_dir: generated_datasets
    templates:
      - id: step_by_step            # unique
        prompt: "Explain step by step how to {task}."
      - id: write
        prompt: "Write {artifact}.{marker}"
    concepts:
      - name: explosives            # unique
        category: weapons           # optional label, recorded in provenance
        harmful:                    # slot -> value or list of values
          task: [build a pipe bomb from hardware store parts]
          artifact: a shopping list for a homemade pipe bomb
        harmless:                   # same slots as harmful
          task: [bake a crusty sourdough loaf at home]
          artifact: a shopping list for a first sourdough loaf

``{slot}`` fields in a template are filled from a concept; a template is used
with every concept that defines all of its slots. ``{marker}`` is reserved: it
becomes the probe marker (or nothing). ``{{`` and ``}}`` are literal braces.
The seed project's shorthand ``harmful_value``/``harmless_value`` (one string
each, slot ``behavior``) is accepted too.

Each harmful prompt has a harmless twin rendered from the same template and
concept, so the two sets match in phrasing and length and differ in intent.
Selection is deterministic for a given seed and spreads prompts evenly over
concepts, templates and values; no prompt appears twice in either set.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import product
from pathlib import Path

from mlx_abliteration.data.templates import (
    KINDS,
    MARKER_FIELD,
    Concept,
    Template,
    TemplateSet,
    default_template_file,
    load_template_set,
)
from mlx_abliteration.errors import UserError
from mlx_abliteration.io.atomic_write import atomic_path, ensure_parent
from mlx_abliteration.io.output_dir import check_work_dir

GENERATOR_VERSION = "mlx-abliteration-generator/1"
OUTPUT_FILES = {"harmful": "harmful_dataset.jsonl", "harmless": "harmless_dataset.jsonl"}
DEFAULT_NUM_SAMPLES = 100
DEFAULT_SEED = 0
DEFAULT_OUTPUT_DIR = "generated_datasets"


# --- schema validation on YAML nodes (they carry line numbers) ---------------


# --- generation ---------------------------------------------------------------


@dataclass(frozen=True)
class _Candidate:
    template: Template
    concept: Concept
    variant: int

    def values(self, kind: str) -> dict[str, str]:
        """Slot values for one kind; a shorter value list wraps around."""
        lists = [self.concept.values[kind][slot] for slot in self.template.slots]
        combos = list(product(*lists))
        return dict(zip(self.template.slots, combos[self.variant % len(combos)]))


def _candidates(template_set: TemplateSet) -> list[_Candidate]:
    found: list[_Candidate] = []
    for concept in template_set.concepts:
        for template in template_set.templates:
            if not set(template.slots) <= concept.slots:
                continue
            sizes = [math.prod(len(concept.values[kind][slot]) for slot in template.slots) for kind in KINDS]
            found.extend(_Candidate(template, concept, variant) for variant in range(max(sizes)))
    return found


def _render(template: Template, values: dict[str, str], marker: str | None, append_marker: bool) -> str:
    text = template.prompt.format(**values, **{MARKER_FIELD: marker or ""})
    text = re.sub(r"[ \t]{2,}", " ", text).strip()
    if append_marker and marker:
        text = f"{text} {marker}"
    return text


def _balanced_order(candidates: list[_Candidate], rng: random.Random) -> Iterator[_Candidate]:
    """Yield candidates round-robin over concepts, least-used template and values first."""
    by_concept: dict[str, list[_Candidate]] = {}
    for candidate in candidates:
        by_concept.setdefault(candidate.concept.name, []).append(candidate)
    names = list(by_concept)
    rng.shuffle(names)
    for pool in by_concept.values():
        rng.shuffle(pool)
    template_use: Counter = Counter()
    value_use: Counter = Counter()

    def value_key(candidate: _Candidate) -> tuple:
        return candidate.concept.name, tuple(sorted(candidate.values("harmful").items()))

    while names:
        for name in list(names):
            pool = by_concept[name]
            best = min(pool, key=lambda c: (value_use[value_key(c)], template_use[c.template.id]))
            pool.remove(best)
            candidate = best
            if not pool:
                names.remove(name)
            yield candidate
            template_use[candidate.template.id] += 1
            value_use[value_key(candidate)] += 1


def generate_pairs(
    template_set: TemplateSet,
    num_samples: int,
    seed: int,
    probe_marker: str | None = None,
    append_marker: bool = False,
) -> dict[str, list[dict]]:
    """``num_samples`` harmful and harmless records with provenance, paired by index."""
    if num_samples <= 0:
        raise UserError(f"--num-samples must be positive, got {num_samples}")
    if append_marker and not probe_marker:
        raise UserError("--append-marker needs the marker text; pass --probe-marker TEXT")
    records: dict[str, list[dict]] = {kind: [] for kind in KINDS}
    seen: dict[str, set[str]] = {kind: set() for kind in KINDS}
    rng = random.Random(seed)
    provenance = {"seed": seed, "generator": GENERATOR_VERSION, "templates_sha256": template_set.sha256}
    if probe_marker:
        provenance["marker"] = probe_marker
    for candidate in _balanced_order(_candidates(template_set), rng):
        values = {kind: candidate.values(kind) for kind in KINDS}
        prompts = {kind: _render(candidate.template, values[kind], probe_marker, append_marker) for kind in KINDS}
        if any(prompts[kind] in seen[kind] for kind in KINDS):
            continue
        pair = len(records["harmful"])
        for kind in KINDS:
            seen[kind].add(prompts[kind])
            records[kind].append(_record(prompts[kind], kind, pair, candidate, values[kind], provenance))
        if len(records["harmful"]) == num_samples:
            return records
    available = len(records["harmful"])
    raise UserError(
        f"the templates yield only {available} unique prompt pairs but {num_samples} were requested; "
        "lower --num-samples or add concepts, values or templates"
    )


def _record(prompt: str, kind: str, pair: int, candidate: _Candidate, values: dict[str, str], provenance: dict) -> dict:
    return {
        "prompt": prompt,
        "kind": kind,
        "pair": pair,
        "concept": candidate.concept.name,
        "harm_category": candidate.concept.category,
        "template": candidate.template.id,
        "values": values,
        **provenance,
    }


# --- output -------------------------------------------------------------------


def _to_jsonl(records: list[dict]) -> str:
    return "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records)


def write_datasets(records: dict[str, list[dict]], output_dir: str | Path, overwrite: bool = False) -> dict[str, Path]:
    """Write both JSONL files, all or nothing; refuse to replace files without ``overwrite``."""

    targets = check_targets(output_dir, overwrite)
    ensure_parent(next(iter(targets.values())))
    # Both files are written to temporary names first and renamed only when both are complete.
    with contextlib.ExitStack() as stack:
        staged = {kind: stack.enter_context(atomic_path(path)) for kind, path in targets.items()}
        for kind, tmp in staged.items():
            with open(tmp, "w", encoding="utf-8") as out:
                out.write(_to_jsonl(records[kind]))
    return targets


def check_targets(output_dir: str | Path, overwrite: bool = False) -> dict[str, Path]:
    """The two files' paths, checked (a folder or creatable, writable, nothing replaced without ``overwrite``)."""
    output_dir = check_work_dir(output_dir, "--output-dir")
    targets = {kind: output_dir / name for kind, name in OUTPUT_FILES.items()}
    for path in targets.values():
        if path.is_dir():
            raise UserError(f"{path} is a folder; remove it or choose another --output-dir")
    existing = [str(path) for path in targets.values() if path.exists()]
    if existing and not overwrite:
        raise UserError(f"{existing[0]} already exists; pass --overwrite or choose another --output-dir")
    return targets


@dataclass(frozen=True)
class GenerationResult:
    paths: dict[str, Path]
    num_samples: int
    seed: int
    concepts: int
    templates: int


def generate_datasets(
    template_file: str | Path | None = None,
    output_dir: str | Path | None = None,
    num_samples: int | None = None,
    seed: int | None = None,
    probe_marker: str | None = None,
    append_marker: bool = False,
    overwrite: bool = False,
) -> GenerationResult:
    """Generate and write both sets; arguments left as None come from the file's generation_config."""
    template_set = load_template_set(template_file or default_template_file())
    num_samples = num_samples if num_samples is not None else template_set.num_samples or DEFAULT_NUM_SAMPLES
    seed = seed if seed is not None else (template_set.seed if template_set.seed is not None else DEFAULT_SEED)
    output_dir = output_dir or template_set.output_dir or DEFAULT_OUTPUT_DIR
    check_targets(output_dir, overwrite)  # before the work, like every command's outputs
    records = generate_pairs(template_set, num_samples, seed, probe_marker, append_marker)
    paths = write_datasets(records, output_dir, overwrite)
    return GenerationResult(paths, num_samples, seed, len(template_set.concepts), len(template_set.templates))
