"""Reading a GGUF file: opening it, its metadata, its architecture, and llama.cpp's tensor names against mlx-lm's."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mlx_abliteration.errors import UserError
from mlx_abliteration.io.gguf_header import check_gguf_header

if TYPE_CHECKING:
    from gguf import GGUFReader


@dataclass(frozen=True)
class Architecture:
    model_type: str
    hf_class: str
    interleaved_rope: bool  # llama.cpp permutes Q/K rows for its interleaved ("normal") RoPE


ARCHITECTURES = {
    "llama": Architecture("llama", "LlamaForCausalLM", interleaved_rope=True),
    "qwen2": Architecture("qwen2", "Qwen2ForCausalLM", interleaved_rope=False),
    "qwen3": Architecture("qwen3", "Qwen3ForCausalLM", interleaved_rope=False),
}


_GLOBAL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}


_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",  # qwen3: RMSNorm of each head's queries and keys
    "attn_k_norm": "self_attn.k_norm",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


IGNORED_TENSORS = {"rope_freqs.weight"}  # folded into config.json's rope_scaling


def open_gguf(path: Path) -> GGUFReader:
    """A ``gguf.GGUFReader`` over ``path``; bad files become one-line ``UserError``s."""
    import gguf

    path = Path(path)
    if not path.is_file():
        raise UserError(f"GGUF file {path} does not exist; pass the path of a .gguf file")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise UserError(f"{path} is not a GGUF file (it does not start with 'GGUF'); pass a llama.cpp .gguf model file")
    check_gguf_header(path)  # gguf-py's reader trusts the file's counts: a hostile header would exhaust memory
    try:
        reader = gguf.GGUFReader(path)
    except (ValueError, IndexError, KeyError, OverflowError) as err:  # what the reader raises on damaged headers
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        if "GGMLQuantizationType" in reason:
            raise UserError(
                f"{path} holds a tensor of unknown type ({reason}); upgrade the gguf package "
                "(pip install -U gguf) or re-export the model with a common type such as Q8_0 or Q4_K_M"
            ) from None
        raise UserError(
            f"cannot read GGUF file {path} ({reason}); the file is truncated or corrupt, download it again"
        ) from None
    return reader  # every tensor's data lies inside the file (check_gguf_header)


_REQUIRED = object()


def metadata(reader: GGUFReader, key: str, default: Any = _REQUIRED) -> Any:
    """A metadata value; a missing key without a default is a ``UserError``."""
    field = reader.fields.get(key)
    if field is not None:
        return field.contents()
    if default is _REQUIRED:
        raise UserError(f"the GGUF file lacks the metadata key {key!r}; re-export it with a current llama.cpp")
    return default


def architecture_of(reader: GGUFReader, path: Path) -> tuple[str, Architecture]:
    name = metadata(reader, "general.architecture", None)
    if name not in ARCHITECTURES:
        raise UserError(
            f"unsupported architecture {name!r} in {Path(path).name}; supported: {', '.join(sorted(ARCHITECTURES))}"
        )
    return name, ARCHITECTURES[name]


def mlx_tensor_name(gguf_name: str) -> str | None:
    """mlx-lm parameter name for a GGUF tensor name; None if the name is unknown."""
    parts = gguf_name.split(".")
    if len(parts) == 2 and parts[0] in _GLOBAL_NAMES and parts[1] in ("weight", "bias"):
        return f"{_GLOBAL_NAMES[parts[0]]}.{parts[1]}"
    if len(parts) == 4 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _LAYER_NAMES:
        if parts[3] in ("weight", "bias"):
            return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}.{parts[3]}"
    return None


def gguf_tensor_name(mlx_name: str) -> str | None:
    """llama.cpp's name for an mlx-lm parameter name (the inverse of ``mlx_tensor_name``); None if unknown."""
    module, _, leaf = mlx_name.rpartition(".")
    if leaf not in ("weight", "bias"):
        return None
    for gguf_module, mlx_module in _GLOBAL_NAMES.items():
        if module == mlx_module:
            return f"{gguf_module}.{leaf}"
    parts = module.split(".", 3)
    if len(parts) == 4 and parts[:2] == ["model", "layers"] and parts[2].isdigit():
        for gguf_module, mlx_module in _LAYER_NAMES.items():
            if parts[3] == mlx_module:
                return f"blk.{parts[2]}.{gguf_module}.{leaf}"
    return None
