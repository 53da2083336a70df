"""The generator's template files: YAML parsed with line numbers, every problem one TemplateError naming the file, line and fix."""

from __future__ import annotations

import hashlib
import re
import string
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from mlx_abliteration.errors import UserError

MARKER_FIELD = "marker"


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


KINDS = ("harmful", "harmless")
