"""Reading a GGUF file: opening it, its metadata and its architecture."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from mlx_abliteration.errors import UserError
from mlx_abliteration.io.gguf_families import GGUF_ARCHITECTURES, Architecture, import_architecture
from mlx_abliteration.io.gguf_header import check_gguf_header

if TYPE_CHECKING:
    from gguf import GGUFReader


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
    experts = metadata(reader, f"{name}.expert_count", 0) if isinstance(name, str) else 0
    arch = import_architecture(name, int(experts)) if isinstance(name, str) else None
    if arch is None:
        raise UserError(
            f"unsupported architecture {name!r} in {Path(path).name}; supported: {', '.join(GGUF_ARCHITECTURES)}"
        )
    return name, arch
