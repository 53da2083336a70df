"""A Hugging Face model card (README.md) for an abliterated model (or a rank-1 adapter).

The YAML header carries what the Hub and users look for: ``base_model`` (the
source's hub id, or the one its own card records), ``base_model_relation``,
``library_name: mlx``, ``pipeline_tag: text-generation`` and the tags ``mlx``,
``abliterated``, ``uncensored``. The body states the method and every
setting, the before/after table (``core.tables``), the tool and library
versions, and how to reproduce the weights.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

from mlx_abliteration.evaluation.tables import eval_markdown
from mlx_abliteration.io.asset_resolver import is_hub_id

# Settings that say where things were written or how the run printed, not what was made.
NOT_SETTINGS = ("output_dir", "overwrite", "dry_run", "cache_dir", "model")


def _metric_rows(metrics: dict) -> str:
    if not metrics.get("after"):
        return "Not evaluated.\n"
    return eval_markdown(metrics.get("before"), metrics["after"])


def card_front_matter(text: str) -> dict:
    """The YAML header of a model card (``---`` ... ``---``), or {}."""
    match = re.match(r"^---\s*\n(.*?)\n---\s*(\n|$)", text, re.S)
    if not match:
        return {}

    try:
        data = yaml.safe_load(match.group(1))
    except yaml.YAMLError:
        return {}
    return data if isinstance(data, dict) else {}


def _hub_id_from_cache_path(path: str) -> str | None:
    # <HF cache>/models--owner--name/snapshots/<rev>
    match = re.search(r"models--([^/]+?)--([^/]+)/snapshots/", path)
    return f"{match.group(1)}/{match.group(2)}" if match else None


def base_model_of(source_model: str | None, source_path: str | None) -> str | None:
    """The hub id to put in ``base_model``: the source's own hub id (given as ``-m owner/name``, or the HF cache
    folder it was downloaded to), else the ``base_model`` the source's own card records; None if neither."""
    model = str(source_model or "")
    if model and is_hub_id(model) and not Path(model).exists():
        return model
    for candidate in (source_path, model):
        if candidate and (hub := _hub_id_from_cache_path(str(Path(candidate).resolve()) + "/")):
            return hub
    if source_path and (Path(source_path) / "README.md").is_file():
        recorded = card_front_matter((Path(source_path) / "README.md").read_text(errors="replace")).get("base_model")
        if isinstance(recorded, list):
            recorded = recorded[0] if recorded else None
        if isinstance(recorded, str) and is_hub_id(recorded):
            return recorded
    return None


def _yaml_header(base: str | None, relation: str, extra_tags: tuple[str, ...] = ()) -> str:
    lines = ["---", "library_name: mlx"]
    if base:
        lines += [f"base_model: {base}", f"base_model_relation: {relation}"]
    lines += ["pipeline_tag: text-generation", "tags:", "- mlx", "- abliterated", "- uncensored"]
    lines += [f"- {tag}" for tag in extra_tags]
    return "\n".join(lines + ["---", ""])


def _settings_table(params: dict) -> str:
    rows = ["| setting | value |", "|---|---|"]
    for key in sorted(params):
        if key in NOT_SETTINGS:
            continue
        value = params[key]
        text = json.dumps(value) if isinstance(value, (list, dict)) else ("default" if value is None else str(value))
        rows.append(f"| `{key}` | `{text}` |")
    return "\n".join(rows) + "\n"


def _versions(versions: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in versions.items() if k != "platform") or "not recorded"


def model_card(record: dict, adapter: dict | None = None) -> str:
    """The card for a saved model's ``abliteration_log.json`` record (``adapter``: the adapter export's summary)."""
    params = record.get("parameters", {})
    source = record.get("source_model", "")
    base = base_model_of(source, record.get("source_path"))
    name = Path(str(params.get("output_dir") or "abliterated-model")).name
    tool = record.get("versions", {}).get("mlx-abliteration", "")
    quant = record.get("quantized_output")
    base_link = f"[{base}](https://huggingface.co/{base})" if base else f"`{source}`"
    relation = "adapter" if adapter else "finetune"
    tags = ("lora",) if adapter else (("quantized", f"{quant['bits']}-bit") if quant else ())
    stored = "Every edited tensor keeps its original dtype and quantization."
    if quant:
        stored = (
            f"The edit was made in full precision, then the whole model was quantized like `mlx_lm.convert -q` "
            f"({quant['mode']}, {quant['bits']} bits, group size {quant['group_size']})."
        )
    plan = record.get("plan", {})
    layer_note = f"taken from layer **{record.get('chosen_layer')}** (`--use-layer {params.get('use_layer')}`)"
    if record.get("plan_spec"):
        layer_note = f"from the search's plan (`plan_spec` in `abliteration_log.json`, nearest probed layer {record.get('chosen_layer')})"
    adapter_part = _adapter_section(adapter, source) if adapter else ""
    return f"""{_yaml_header(base, relation, tags)}
# {name}

This {"adapter makes" if adapter else "model is"} {base_link} with its refusal direction removed by
abliteration (directional orthogonalization of every matrix that writes into
the residual stream), made with [mlx-abliteration](https://pypi.org/project/mlx-abliteration/)
{tool}.

## Method
- Refusal direction: difference of mean residual-stream activations between harmful and
  harmless prompts (`{params.get("direction_variant")}`), probed at position `{params.get("probe_position")}`,
  {layer_note}.
- Every module that writes into the residual stream (found on the model's own forward pass,
  {sum(1 for _ in plan.get("writers", {}))} modules) is orthogonalized: `W' = W - s u (u^T W)`, `u` the unit
  direction (post-norm writers: the norm gain times it, normalized); embedding rows `E' = E - s (E r) r^T`.
- Strength {params.get("ablation_strength")}, layers `{params.get("ablate_layers")}`,
  magnitude-preserving: {params.get("norm_preserve")}.
- {stored}
{adapter_part}
### Every setting
{_settings_table(params)}
## Evaluation (held-out prompts)
{_metric_rows(record.get("metrics", {}))}
All parameters, per-layer statistics, the prompts' and weights' SHA256 are in `abliteration_log.json`;
the direction is in `refusal_direction.safetensors`.

## Reproduce
Made with mlx-abliteration {tool} ({_versions(record.get("versions", {}))}). With the same prompts
(their SHA256 are in the log), on the same machine and backend, this rebuilds bit-identical weights and
says whether they match the log's SHA256:
```bash
pip install mlx-abliteration=={tool}
mlx-abliterate run --reproduce abliteration_log.json -o ./reproduced
```

## Use
```python
from mlx_lm import load, generate

model, tokenizer = load("{"path/to/base/model" if adapter else "path/to/this/model"}"{', adapter_path="path/to/this/adapter"' if adapter else ""})
messages = [{{"role": "user", "content": "Hello!"}}]
prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
print(generate(model, tokenizer, prompt=prompt, max_tokens=256))
```

Abliteration removes a safety behaviour. You are responsible for how you use this model.
"""


def _adapter_section(adapter: dict, source: str) -> str:
    lines = [
        "",
        "## Adapter",
        f"A rank-1 mlx-lm LoRA adapter ({adapter.get('size_bytes', 0) / 1e6:.2f} MB, {adapter.get('modules', 0)} modules) "
        f"on `{source}`: for each edited writer `lora_a = W^T u`, `lora_b = -s u^T`, scale 1, so "
        "`W x + lora_b^T (lora_a^T x) = W' x`.",
    ]
    missing = adapter.get("not_expressed") or []
    if missing:
        lines.append(
            "Parts of the full edit this adapter cannot express (mlx-lm adapters only wrap linear layers "
            "inside the decoder layers, add no bias, and are linear in W):"
        )
        lines += [f"- {item}" for item in missing]
    return "\n".join(lines) + "\n"
