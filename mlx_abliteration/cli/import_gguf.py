"""``mlx-abliterate import-gguf MODEL.gguf -o DIR``: convert a llama.cpp GGUF file to an MLX model dir."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from mlx_abliteration.io.gguf import convert_gguf

HELP = "convert a llama.cpp GGUF model file into an MLX model directory"
DESCRIPTION = (
    "Convert a GGUF file (llama incl. Mistral and Mixtral, qwen2, qwen3, qwen3moe, phi3, gemma2, gemma3) into an "
    "MLX model directory. Q4_0/Q4_1/Q8_0 tensors stay "
    "quantized (MLX affine, group 32); every other type is dequantized to --dtype. Writes "
    "safetensors weights, config.json and the tokenizer with its chat template."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("gguf", type=Path, metavar="MODEL.gguf", help="GGUF file to convert")
    parser.add_argument("-o", "--output-dir", type=Path, required=True, help="directory to create")
    parser.add_argument(
        "--dtype",
        choices=("bfloat16", "float16"),
        default="bfloat16",
        help="dtype of dequantized tensors and of quantization scales (float16 keeps Q4/Q8 scales exact)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing non-empty output dir")


def main(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    out = convert_gguf(args.gguf, args.output_dir, dtype=args.dtype, overwrite=args.overwrite)
    print(f"converted {args.gguf} -> {out} in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    print(out)
    return 0
