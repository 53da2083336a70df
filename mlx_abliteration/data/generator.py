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
import hashlib
import json
import math
import random
import re
import string
from collections import Counter
from collections.abc import Iterator
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from importlib import resources
from itertools import product
from pathlib import Path

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from mlx_abliteration.errors import UserError
from mlx_abliteration.io.atomic_write import atomic_path, ensure_parent

GENERATOR_VERSION = "mlx-abliteration-generator/1"
KINDS = ("harmful", "harmless")
MARKER_FIELD = "marker"
OUTPUT_FILES = {"harmful": "harmful_dataset.jsonl", "harmless": "harmless_dataset.jsonl"}
DEFAULT_NUM_SAMPLES = 100
DEFAULT_SEED = 0
DEFAULT_OUTPUT_DIR = "generated_datasets"
LEGACY_SLOT = "behavior"
_SLOT_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class TemplateError(UserError):
    """A template file that does not follow the schema (names the key and line)."""


@dataclass(frozen=True)
class Template:
    id: str
    prompt: str
    slots: tuple[str, ...]


@dataclass(frozen=True)
class Concept:
    name: str
    category: str | None
    values: dict[str, dict[str, tuple[str, ...]]]  # kind -> slot -> values

    @property
    def slots(self) -> frozenset[str]:
        return frozenset(self.values["harmful"])


@dataclass(frozen=True)
class TemplateSet:
    templates: tuple[Template, ...]
    concepts: tuple[Concept, ...]
    num_samples: int | None
    seed: int | None
    output_dir: str | None
    sha256: str


def default_template_file() -> Path:
    """The packaged ``templates.yaml`` the default prompt sets were made from."""
    return Path(str(resources.files("mlx_abliteration") / "data" / "templates.yaml"))


# --- schema validation on YAML nodes (they carry line numbers) ---------------


class _Checker:
    def __init__(self, source: str):
        self.source = source

    def fail(self, node: Node, key: str, problem: str) -> TemplateError:
        line = node.start_mark.line + 1
        return TemplateError(f"{self.source}:{line}: {key}: {problem}")

    def mapping(
        self, node: Node, key: str, allowed: AbstractSet[str], required: AbstractSet[str] = frozenset()
    ) -> dict:
        if not isinstance(node, MappingNode):
            raise self.fail(node, key, f"expected a mapping, got {_node_kind(node)}")
        entries: dict[str, tuple[Node, Node]] = {}
        for key_node, value_node in node.value:
            name = key_node.value if isinstance(key_node, ScalarNode) else None
            if name is None:
                raise self.fail(key_node, key, "keys must be plain strings")
            if name in entries:
                raise self.fail(key_node, f"{key}.{name}", "duplicate key; keep one")
            if name not in allowed:
                raise self.fail(key_node, f"{key}.{name}", f"unknown key; allowed: {', '.join(sorted(allowed))}")
            entries[name] = (key_node, value_node)
        missing = sorted(required - set(entries))
        if missing:
            raise self.fail(node, key, f"missing required key '{missing[0]}'")
        return {name: value for name, (_, value) in entries.items()}

    def sequence(self, node: Node, key: str) -> list[Node]:
        if not isinstance(node, SequenceNode) or not node.value:
            raise self.fail(node, key, f"expected a non-empty list, got {_node_kind(node)}")
        return node.value

    def text(self, node: Node, key: str) -> str:
        if not isinstance(node, ScalarNode) or node.tag == "tag:yaml.org,2002:null" or not node.value.strip():
            raise self.fail(node, key, f"expected a non-empty string, got {_node_kind(node)}")
        return " ".join(node.value.split())

    def integer(self, node: Node, key: str, minimum: int) -> int:
        if isinstance(node, ScalarNode) and node.tag == "tag:yaml.org,2002:int" and int(node.value, 0) >= minimum:
            return int(node.value, 0)
        shown = repr(node.value) if isinstance(node, ScalarNode) else _node_kind(node)
        raise self.fail(node, key, f"expected an integer >= {minimum}, got {shown}")

    def texts(self, node: Node, key: str) -> tuple[str, ...]:
        items = [node] if isinstance(node, ScalarNode) else self.sequence(node, key)
        values = []
        for index, item in enumerate(items):
            value = self.text(item, f"{key}[{index}]")
            if value in values:
                raise self.fail(item, f"{key}[{index}]", f"duplicate value {value!r}")
            values.append(value)
        return tuple(values)


def _node_kind(node: Node) -> str:
    if isinstance(node, MappingNode):
        return "a mapping"
    if isinstance(node, SequenceNode):
        return "a list" if node.value else "an empty list"
    if node.tag == "tag:yaml.org,2002:null" or not node.value.strip():
        return "nothing"
    return f"{node.value!r}"


def _template_slots(check: _Checker, node: Node, key: str, prompt: str) -> tuple[str, ...]:
    slots: list[str] = []
    try:
        parsed = list(string.Formatter().parse(prompt))
    except ValueError as err:
        raise check.fail(node, key, f"bad braces ({err}); write literal braces as {{{{ and }}}}") from None
    for _, field, spec, conversion in parsed:
        if field is None:
            continue
        if not _SLOT_NAME.match(field) or spec or conversion:
            raise check.fail(node, key, f"bad placeholder {{{field}}}; use {{slot_name}} with letters, digits, _")
        if field != MARKER_FIELD and field not in slots:
            slots.append(field)
    if not slots:
        raise check.fail(node, key, "uses no {slot}; the harmful and harmless prompts would be identical")
    return tuple(slots)


def _parse_templates(check: _Checker, node: Node) -> tuple[Template, ...]:
    templates: list[Template] = []
    seen: set[str] = set()
    for index, item in enumerate(check.sequence(node, "templates")):
        key = f"templates[{index}]"
        fields = check.mapping(item, key, {"id", "prompt"}, {"id", "prompt"})
        template_id = check.text(fields["id"], f"{key}.id")
        if template_id in seen:
            raise check.fail(fields["id"], f"{key}.id", f"duplicate template id {template_id!r}")
        seen.add(template_id)
        prompt = check.text(fields["prompt"], f"{key}.prompt")
        slots = _template_slots(check, fields["prompt"], f"{key}.prompt", prompt)
        templates.append(Template(template_id, prompt, slots))
    return tuple(templates)


def _parse_side(check: _Checker, node: Node, key: str) -> dict[str, tuple[str, ...]]:
    if not isinstance(node, MappingNode) or not node.value:
        raise check.fail(node, key, "expected a mapping of slot names to values")
    side = {}
    for key_node, value_node in node.value:
        slot = key_node.value if isinstance(key_node, ScalarNode) else ""
        if not _SLOT_NAME.match(slot) or slot == MARKER_FIELD:
            raise check.fail(key_node, f"{key}.{slot}", "slot names are identifiers and 'marker' is reserved")
        if slot in side:
            raise check.fail(key_node, f"{key}.{slot}", "duplicate key; keep one")
        side[slot] = check.texts(value_node, f"{key}.{slot}")
    return side


def _parse_concept(check: _Checker, node: Node, key: str) -> Concept:
    allowed = {"name", "category", "harmful", "harmless", "harmful_value", "harmless_value"}
    fields = check.mapping(node, key, allowed, {"name"})
    name = check.text(fields["name"], f"{key}.name")
    category = check.text(fields["category"], f"{key}.category") if "category" in fields else None
    values = {}
    for kind in KINDS:
        if kind in fields and f"{kind}_value" in fields:
            raise check.fail(fields[kind], f"{key}.{kind}", f"use either '{kind}' or '{kind}_value', not both")
        if kind in fields:
            values[kind] = _parse_side(check, fields[kind], f"{key}.{kind}")
        elif f"{kind}_value" in fields:
            values[kind] = {LEGACY_SLOT: (check.text(fields[f"{kind}_value"], f"{key}.{kind}_value"),)}
        else:
            raise check.fail(node, key, f"missing required key '{kind}'")
    if set(values["harmful"]) != set(values["harmless"]):
        raise check.fail(
            fields.get("harmless", node),
            f"{key}.harmless",
            f"slots {sorted(values['harmless'])} differ from harmful slots {sorted(values['harmful'])}; define the same slots on both sides",
        )
    for slot, harmful in values["harmful"].items():
        shared = set(harmful) & set(values["harmless"][slot])
        if shared:
            raise check.fail(
                node, f"{key}.harmless.{slot}", f"value {sorted(shared)[0]!r} is also harmful; make it benign"
            )
    return Concept(name, category, values)


def _parse_concepts(check: _Checker, node: Node) -> tuple[Concept, ...]:
    concepts: list[Concept] = []
    for index, item in enumerate(check.sequence(node, "concepts")):
        concept = _parse_concept(check, item, f"concepts[{index}]")
        if any(c.name == concept.name for c in concepts):
            raise check.fail(item, f"concepts[{index}].name", f"duplicate concept name {concept.name!r}")
        concepts.append(concept)
    return tuple(concepts)


def _check_coverage(
    check: _Checker, fields: dict, templates: tuple[Template, ...], concepts: tuple[Concept, ...]
) -> None:
    """Every template fits some concept and every concept fits some template."""
    for index, (template, item) in enumerate(zip(templates, fields["templates"].value)):
        if not any(set(template.slots) <= concept.slots for concept in concepts):
            prompt_node = next(value for key, value in item.value if key.value == "prompt")
            raise check.fail(
                prompt_node,
                f"templates[{index}].prompt",
                f"no concept defines all of its slots {list(template.slots)}; add them to a concept or fix the name",
            )
    for index, (concept, item) in enumerate(zip(concepts, fields["concepts"].value)):
        if not any(set(template.slots) <= concept.slots for template in templates):
            raise check.fail(
                item,
                f"concepts[{index}]",
                f"no template uses only its slots {sorted(concept.slots)}; add a template or rename the slots",
            )


def parse_template_set(text: str, source: str = "<templates>") -> TemplateSet:
    """Validate a template file's text; errors name the key and the YAML line."""
    check = _Checker(source)
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{source}:{mark.line + 1}" if mark else source
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise TemplateError(f"{where}: invalid YAML ({problem}); fix the syntax") from None
    if root is None:
        raise TemplateError(f"{source}: empty template file; add 'templates' and 'concepts'")
    required = {"templates", "concepts"}
    fields = check.mapping(root, "templates file", required | {"version", "generation_config"}, required)
    if "version" in fields and (not isinstance(fields["version"], ScalarNode) or fields["version"].value != "1"):
        raise check.fail(fields["version"], "version", "unsupported version; this generator reads version 1")
    config = {}
    if "generation_config" in fields:
        config = check.mapping(fields["generation_config"], "generation_config", {"num_samples", "seed", "output_dir"})
    templates = _parse_templates(check, fields["templates"])
    concepts = _parse_concepts(check, fields["concepts"])
    _check_coverage(check, fields, templates, concepts)
    return TemplateSet(
        templates=templates,
        concepts=concepts,
        num_samples=check.integer(config["num_samples"], "generation_config.num_samples", 1)
        if "num_samples" in config
        else None,
        seed=check.integer(config["seed"], "generation_config.seed", 0) if "seed" in config else None,
        output_dir=check.text(config["output_dir"], "generation_config.output_dir") if "output_dir" in config else None,
        sha256=hashlib.sha256(text.encode("utf-8")).hexdigest(),
    )


def load_template_set(path: str | Path) -> TemplateSet:
    """Read and validate a template file."""
    path = Path(path).expanduser()
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"template file {path} not found; pass an existing --template-file") from None
    except IsADirectoryError:
        raise UserError(f"template file {path} is a directory; pass a .yaml file") from None
    except UnicodeDecodeError:
        raise UserError(f"template file {path} is not UTF-8 text; save it as UTF-8") from None
    except OSError as err:
        raise UserError(f"cannot read template file {path} ({err.strerror}); check its permissions") from None
    return parse_template_set(text, source=path.name)


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

    output_dir = Path(output_dir).expanduser()
    targets = {kind: output_dir / name for kind, name in OUTPUT_FILES.items()}
    existing = [str(path) for path in targets.values() if path.exists()]
    if existing and not overwrite:
        raise UserError(f"{existing[0]} already exists; pass --overwrite or choose another --output-dir")
    ensure_parent(next(iter(targets.values())))
    # Both files are written to temporary names first and renamed only when both are complete.
    with contextlib.ExitStack() as stack:
        staged = {kind: stack.enter_context(atomic_path(path)) for kind, path in targets.items()}
        for kind, tmp in staged.items():
            with open(tmp, "w", encoding="utf-8") as out:
                out.write(_to_jsonl(records[kind]))
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
    records = generate_pairs(template_set, num_samples, seed, probe_marker, append_marker)
    paths = write_datasets(records, output_dir, overwrite)
    return GenerationResult(paths, num_samples, seed, len(template_set.concepts), len(template_set.templates))
