"""The architecture proof: abliterate a tiny model through the CLI, then check the saved model's own forward pass.

Test helper (not a test file), shared by ``tests/test_arch_proof.py`` and
``scripts/support_table.py``. For one model type: build a tiny random model
(``arch_zoo``), run ``mlx-abliterate ablate`` with a random unit direction r on
every layer at strength 1, load the output with ``mlx_lm.load`` and, on a real
forward pass, check that the embedding output and every decoder layer's update
``h_out - h_in`` have no component along r, that only the writers changed,
that every tensor kept its dtype and quantization, and that generation runs.
"""

from __future__ import annotations

import contextlib
import io
import json
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx

from . import arch_zoo

TOKENS = [5, 17, 42, 99, 7, 250, 31, 8, 120, 64, 3, 77]
TOLERANCE = {"float32": 1e-3, "bfloat16": 1e-2}  # |r . dh| / |dh| at every position


@dataclass
class Proof:
    model_type: str
    supported: bool
    reason: str = ""  # the one-line refusal when not supported
    worst: float = 0.0  # max |r . dh| / |dh| over layers and positions (and the embedding output)
    source_worst: float = 0.0  # the same on the unedited model (quantized variants are bounded by it)
    writers: int = 0
    problems: list[str] = field(default_factory=list)


def unit_direction(model_type: str, size: int) -> mx.array:
    seed = sum(map(ord, model_type))
    r = mx.random.normal((size,), key=mx.random.key(seed))
    return r / mx.linalg.norm(r)


def prove(model_type: str, workdir: Path, dtype: str = "float32", bits: int | None = None) -> Proof:
    from mlx_abliteration.probe.directions import LayerStats, RefusalDirections, save_directions

    src = arch_zoo.build_tiny_model_dir(model_type, workdir / "src", dtype=dtype, quantize_bits=bits)
    source_model, _ = _load(src)
    num_layers = len(arch_zoo.decoder_layer_list(source_model))
    try:
        size = arch_zoo.residual_trace(source_model, TOKENS)[0].shape[-1]
    except RuntimeError:  # a model that never calls its layers: the CLI must refuse it
        size = arch_zoo.HIDDEN
    r = unit_direction(model_type, size)
    direction_file = workdir / "direction.safetensors"
    stats = [LayerStats(i, 1.0, 0.1, 0.9, 2.0) for i in range(num_layers)]
    save_directions(
        direction_file,
        RefusalDirections(list(range(num_layers)), mx.stack([r] * num_layers), stats, "mean-diff", num_layers),
        0,
    )
    out = workdir / "out"
    code, err = _cli("ablate", "-m", str(src), "--direction", str(direction_file), "-o", str(out), "--quiet")
    if code != 0:
        lines = [line for line in err.strip().splitlines() if line.strip()]
        proof = Proof(model_type, False, lines[-1] if lines else f"exit code {code}")
        if len(lines) != 1 or out.exists():
            proof.problems.append(f"not a clean one-line refusal: {err.strip()[-400:]}")
        return proof
    proof = Proof(model_type, True)
    log = json.loads((out / "abliteration_log.json").read_text())
    writers = set(log["plan"]["writers"])
    proof.writers = len(writers)
    model, tokenizer = _load(out)
    proof.problems += _changed_only_writers(source_model, model, writers)
    proof.worst = _worst_component(model, r)
    proof.source_worst = _worst_component(source_model, r)
    limit = TOLERANCE.get(dtype, 1e-2) if bits is None else 0.5 * proof.source_worst
    if not proof.worst <= limit:
        proof.problems.append(f"the residual stream keeps {proof.worst:.2e} of r (limit {limit:.2e})")
    import mlx_lm

    with contextlib.redirect_stdout(io.StringIO()):
        mlx_lm.generate(model, tokenizer, prompt="hello", max_tokens=2)
    return proof


def _load(path: Path):
    import mlx_lm

    return mlx_lm.load(str(path))


def _cli(*args: str) -> tuple[int, str]:
    from mlx_abliteration.cli.main import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = main(list(args))
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else 1
    return code or 0, err.getvalue()


def _worst_component(model, r: mx.array) -> float:
    """max over positions of |r . x| / |x| for the embedding output and each layer's update (float32)."""
    embed_out, layers = arch_zoo.residual_trace(model, TOKENS)
    worst = _ratio(embed_out, r)
    previous = embed_out
    for _, h_out in layers:
        worst = max(worst, _ratio(h_out.astype(mx.float32) - previous.astype(mx.float32), r))
        previous = h_out
    return worst


def _ratio(x: mx.array, r: mx.array) -> float:
    rows = x.astype(mx.float32).reshape(-1, r.shape[-1])
    size = mx.linalg.norm(rows, axis=-1)
    ratio = mx.abs(rows @ r) / mx.maximum(size, 1e-30)
    value = float(mx.max(mx.where(size > 1e-6 * mx.max(size), ratio, 0.0)).item())
    return value if value == value else float("inf")


def _changed_only_writers(source_model, model, writers: set[str]) -> list[str]:
    """Parameters (as mlx_lm.load builds the model) that changed outside the writers, writers that did not, dtype changes."""
    from mlx.utils import tree_flatten

    before, after = dict(tree_flatten(source_model.parameters())), dict(tree_flatten(model.parameters()))
    problems = []
    if before.keys() != after.keys():
        problems.append(f"parameter names differ: {sorted(before.keys() ^ after.keys())[:4]}")
    changed_modules = set()
    for name in before.keys() & after.keys():
        a, b = before[name], after[name]
        if a.dtype != b.dtype or a.shape != b.shape:
            problems.append(f"{name}: {a.dtype}{a.shape} -> {b.dtype}{b.shape}")
        elif not mx.allclose(a, b, rtol=1e-5, atol=1e-6):
            # (not bit equality: a sanitize() that is idempotent only up to rounding,
            # e.g. Baichuan-M1 renormalizing lm_head rows, runs once more on reload)
            changed_modules.add(name.rpartition(".")[0])
    if changed_modules - writers:
        problems.append(f"non-writers changed: {sorted(changed_modules - writers)[:4]}")
    if writers - changed_modules:
        problems.append(f"writers unchanged: {sorted(writers - changed_modules)[:4]}")
    return problems


# Architectures the engine refuses, each with what its refusal says and why.
REFUSED: dict[str, tuple[str, str]] = {
    "deepseek_v41": (
        "several parallel residual streams",
        "layers carry several parallel residual streams (hyper-connections)",
    ),
    "gemma3n": ("several parallel residual streams", "AltUp: layers carry several parallel residual streams"),
    "iquestloopcoder": (
        "never called the first decoder layer",
        "the forward pass loops over its layers' parts without calling the layers",
    ),
    "longcat_flash": ("no editable matrix", "zero-compute (identity) experts add the normalized input itself"),
    "longcat_flash_ngram": ("no editable matrix", "zero-compute (identity) experts add the normalized input itself"),
    "rwkv7": (
        "no editable matrix",
        "the first layer replaces the stream by a LayerNorm of it (a bias no matrix edit removes)",
    ),
}

# Extra variants: bf16 storage, and 4-bit for a dense, a MoE and a post-norm family.
VARIANTS: list[tuple[str, str, int | None]] = [
    ("llama", "bfloat16", None),
    ("llama", "float32", 4),
    ("mixtral", "float32", 4),
    ("gemma2", "float32", 4),
]


def cases() -> list[tuple[str, str, int | None]]:
    return [(t, "float32", None) for t in arch_zoo.text_model_types() if t not in arch_zoo.UNBUILDABLE] + VARIANTS


def support_table() -> str:
    """The README's support table: every model type of the installed mlx-lm, from the proof's lists."""
    import importlib.metadata

    rows = ["| model_type | status |", "|---|---|"]
    for model_type in arch_zoo.text_model_types():
        if model_type in arch_zoo.UNBUILDABLE:
            status = f"not tested: {arch_zoo.UNBUILDABLE[model_type]}"
        elif model_type in REFUSED:
            status = f"refused: {REFUSED[model_type][1]}"
        else:
            status = "supported (proven)"
        rows.append(f"| `{model_type}` | {status} |")
    supported = sum("supported" in row for row in rows)
    version = importlib.metadata.version("mlx-lm")
    head = (
        f"mlx-lm {version}: {len(arch_zoo.text_model_types())} model types, {supported} supported and proven, "
        f"{len(REFUSED)} refused, {len(arch_zoo.UNBUILDABLE)} not testable here."
    )
    return head + "\n\n" + "\n".join(rows)
