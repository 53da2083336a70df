"""A Hugging Face model card (README.md) for an abliterated model."""

from __future__ import annotations


def _metric_rows(metrics: dict) -> str:
    from .tables import eval_markdown

    if not metrics.get("after"):
        return "Not evaluated.\n"
    return eval_markdown(metrics.get("before"), metrics["after"])


def model_card(record: dict) -> str:
    params = record.get("parameters", {})
    base = record.get("source_model", "")
    name = params.get("output_dir") or "abliterated-model"
    return f"""---
library_name: mlx
base_model: {base}
tags:
- mlx
- abliterated
- uncensored
pipeline_tag: text-generation
---

# {name}

This model is [{base}]({base}) with its refusal direction removed by
abliteration (directional orthogonalization of every matrix that writes into
the residual stream), made with [mlx-abliteration](https://pypi.org/project/mlx-abliteration/)
{record.get("versions", {}).get("mlx-abliteration", "")}.

## Method
- Refusal direction: difference of mean residual-stream activations between harmful and
  harmless prompts (`{params.get("direction_variant")}`), probed at position `{params.get("probe_position")}`,
  taken from layer **{record.get("chosen_layer")}** (`--use-layer {params.get("use_layer")}`).
- Edited: {", ".join(params.get("targets", []))}; strength {params.get("ablation_strength")},
  layers `{params.get("ablate_layers")}`, magnitude-preserving: {params.get("norm_preserve")}.
- Every edited tensor keeps its original dtype and quantization.

## Evaluation (held-out prompts)
{_metric_rows(record.get("metrics", {}))}
All parameters, per-layer statistics and SHA256 digests are in `abliteration_log.json`;
the direction is in `refusal_direction.safetensors`.

## Use
```python
from mlx_lm import load, generate

model, tokenizer = load("path/to/this/model")
messages = [{{"role": "user", "content": "Hello!"}}]
prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
print(generate(model, tokenizer, prompt=prompt, max_tokens=256))
```

Abliteration removes a safety behaviour. You are responsible for how you use this model.
"""
