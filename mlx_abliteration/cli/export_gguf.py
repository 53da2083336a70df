"""``mlx-abliterate export-gguf MODEL_DIR -o model.gguf``: write an MLX model as one llama.cpp GGUF file."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from mlx_abliteration.cli.console import Console
from mlx_abliteration.export.gguf_export import OUTTYPES, describe, export_gguf
from mlx_abliteration.pipeline.events import Reporter

HELP = "write an MLX model directory (e.g. an abliterated output) as a llama.cpp GGUF file"
DESCRIPTION = (
    "Write an MLX model directory (llama, mistral, mixtral, qwen2, qwen3, qwen3_moe, phi3, gemma2, gemma3_text) "
    "as one GGUF file for llama.cpp, Ollama or LM Studio: "
    "llama.cpp's tensor names and Q/K layout, the hyperparameters, the tokenizer and its chat template. "
    "Quantized MLX weights are dequantized first; matrices are written as --outtype, norms and biases "
    "as float32. The inverse of import-gguf."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model_dir", type=Path, metavar="MODEL_DIR", help="MLX model directory to export")
    parser.add_argument("-o", "--output", type=Path, required=True, help="GGUF file to write, e.g. model.gguf")
    parser.add_argument(
        "--outtype",
        choices=OUTTYPES,
        default="bf16",
        help="type of the weight matrices: bf16 (a bf16 model is copied exactly), f16, or q8_0 "
        "(8-bit blocks of 32, about half the size of bf16)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output file")


def main(args: argparse.Namespace) -> int:
    console = Console()
    start = time.perf_counter()
    try:
        out = export_gguf(args.model_dir, args.output, args.outtype, args.overwrite, Reporter(console).progress)
    finally:
        console.close_bars()
    info = describe(out)
    types = ", ".join(f"{n} {t}" for t, n in sorted(info["types"].items()))
    print(
        f"saved {out} ({info['bytes'] / 1e6:.1f} MB, {info['tensors']} tensors: {types}) "
        f"in {time.perf_counter() - start:.1f} s",
        file=sys.stderr,
    )
    print(out)
    return 0
