"""The tensors a saved model is made of, in the layout ``mlx_lm.load`` builds the model from.

mlx-lm's ``sanitize()`` may rename, transpose or stack tensors on load (an
HF-layout GPT-2 folder's Conv1D weights are transposed, Mixtral-style experts
stacked). Edits are decided on the loaded model, so they must be written in
the loaded layout: when ``sanitize`` leaves every tensor as it is, the source
shards are the layout (unedited shards are copied byte for byte); otherwise
the sanitized tensors are written as fresh MLX shards.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import mlx.core as mx
from mlx.utils import tree_flatten, tree_map

from mlx_abliteration.errors import UserError
from mlx_abliteration.io.model_checks import model_classes
from mlx_abliteration.io.model_io import load_model, load_shard, read_config, shard_layout
from mlx_abliteration.probe.capture import decoder_layers
from mlx_abliteration.probe.writer_discovery import discover_writers
from mlx_abliteration.runtime.mx_types import load_arrays

if TYPE_CHECKING:
    from mlx_abliteration.probe.writers import WriterMap


@dataclass
class SourceLayout:
    source: Path
    shards: list[str]
    weight_map: dict[str, str]  # tensor name -> shard name
    index_metadata: dict
    copyable: bool  # the source shards are the loaded layout: unedited ones are copied as they are
    config: dict  # the config.json to write
    write_index: bool
    _tensors: dict = field(default_factory=dict, repr=False)  # loaded-layout tensors (lazy) when not copyable

    def load(self, shard: str) -> tuple[dict, dict]:
        """(tensors, metadata) of one output shard."""
        if self.copyable:
            return load_shard(self.source / shard)
        return {k: self._tensors[k] for k, s in self.weight_map.items() if s == shard}, {"format": "mlx"}

    def tensor(self, name: str) -> mx.array:
        return self.load(self.weight_map[name])[0][name] if self.copyable else self._tensors[name]


def open_layout(source: Path, config: dict) -> SourceLayout:
    shards, weight_map, index_meta = shard_layout(source)
    if _sanitize_keeps_tensors(source, shards, config):
        return SourceLayout(
            source,
            shards,
            weight_map,
            index_meta,
            True,
            config,
            write_index=(source / "model.safetensors.index.json").exists(),
        )
    return _loaded_layout(source, config)


def _sanitize_keeps_tensors(source: Path, shards: list[str], config: dict) -> bool:
    """Whether mlx-lm's ``sanitize`` returns every stored tensor unchanged (the usual MLX-layout case)."""

    model_class, args_class = model_classes(config)
    model = model_class(args_class.from_dict(config))  # parameters stay lazy: nothing is computed
    if not hasattr(model, "sanitize"):
        return True
    raw: dict[str, mx.array] = {}
    for shard in shards:
        raw.update(load_arrays(str(source / shard)))
    sanitized = model.sanitize(dict(raw))
    return all(name in raw and value is raw[name] for name, value in sanitized.items())


def _loaded_layout(source: Path, config: dict) -> SourceLayout:
    from mlx_lm.utils import load_model, make_shards

    try:
        model, loaded_config = load_model(source, lazy=True)
    except (ValueError, KeyError) as err:
        raise UserError(f"mlx-lm cannot load {source}: {err}") from None
    tensors = dict(tree_flatten(model.parameters()))
    groups = make_shards(tensors)
    names = (
        ["model.safetensors"]
        if len(groups) == 1
        else [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))]
    )
    weight_map = {k: name for name, group in zip(names, groups) for k in group}
    out_config = dict(config)
    if (
        "quantization" in loaded_config and "quantization" not in config
    ):  # e.g. AWQ/GPTQ packed into MLX's format on load
        out_config["quantization"] = loaded_config["quantization"]
        out_config.pop("quantization_config", None)
    return SourceLayout(source, names, weight_map, {}, False, out_config, write_index=len(names) > 1, _tensors=tensors)


def discover_writers_in_dir(source: Path) -> WriterMap:
    """The residual writers of the model in ``source``, found on a lazily opened copy.

    Each decoder layer's weights are dropped once the layer has been tested,
    so at most one layer (plus the embedding) is resident.
    """

    model, _, _ = load_model(source, lazy=True)
    layers = decoder_layers(model)
    empty = mx.zeros((0,))

    def release(index: int) -> None:
        layers[index].update(tree_map(lambda _: empty, layers[index].parameters()))

    return discover_writers(model, str(read_config(source).get("model_type")), release=release)
