"""What a residual writer is: a module whose output is added into the residual stream, with the
direction its edit uses (r, or u = g * r / |g * r| behind a post-norm) and its branch (attn, mlp, embed).
``writer_discovery`` finds them on the model itself."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import mlx.core as mx

PROBE_TOKENS = 16  # tokens of the discovery forward pass (enough to route to most MoE experts)
_BRANCH_WORDS = (
    "attn",
    "attention",
    "mixer",
    "mamba",
    "conv",
    "temporal",
    "time_mix",
    "ssm",
    "token_mix",
    "linear_attn",
)


@dataclass(eq=False)
class Writer:
    """One module that writes into the residual stream.

    ``rows``: an embedding table (edit its rows, E' = E - s (E u) u^T);
    otherwise a linear map stored (out, in) (W' = W - s u (u^T W)).
    ``gain``: the per-channel gain of a norm between the module and the
    residual add (post-norm blocks); the module is edited against g * r.
    """

    path: str
    role: str  # "embed" | "attn" | "mlp": which strength applies
    layer: int | None
    rows: bool
    norm: str | None = None
    gain: mx.array | None = field(default=None, repr=False)

    def direction(self, r: mx.array) -> mx.array:
        r = r.astype(mx.float32)
        if self.gain is None:
            return r
        u = self.gain.astype(mx.float32) * r
        return u / mx.maximum(mx.linalg.norm(u), 1e-30)

    def to_dict(self) -> dict:
        return {"role": self.role, "layer": self.layer, "rows": self.rows, "norm": self.norm}


WriterMap = dict[str, Writer]  # module path -> Writer


def branch_role(path: str) -> str:
    """ "attn" for attention / mixer branches, else "mlp" (which strength a writer gets)."""
    parts = path.lower().split(".")
    return "attn" if any(word in part for part in parts for word in _BRANCH_WORDS) else "mlp"


# --- the tests -------------------------------------------------------------------


# --- discovery ----------------------------------------------------------------------


def describe_writers(writers: WriterMap) -> str:
    """One line: which modules write into the residual stream (per layer) and the embedding tables."""
    per_layer: dict[str, None] = {}
    embeds = []
    for w in writers.values():
        if w.layer is None:
            embeds.append(w.path)
            continue
        name = short_path(w.path, w.layer)
        per_layer[re.sub(r"\.\d+\.", ".*.", name) + (f" (behind {short_path(w.norm, w.layer)})" if w.norm else "")] = (
            None
        )
    layers = len({w.layer for w in writers.values() if w.layer is not None})
    return f"{len(writers)} residual writers: {', '.join(per_layer) or 'none'} in {layers} layers; embedding: {', '.join(embeds) or 'none'}"


def short_path(path: str, layer: int) -> str:
    match = re.search(rf"\.{layer}\.(.+)$", path)
    return match.group(1) if match else path
