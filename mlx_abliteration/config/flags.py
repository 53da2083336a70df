"""The settings as command-line flags (run / probe / ablate / search): one definition of each, built from the defaults."""

from __future__ import annotations

import argparse

from mlx_abliteration.config.defaults import (
    DIRECTION_VARIANTS,
    EDITED_PRECISIONS,
    GENERATION_BATCH_SIZE,
    MAX_STRENGTH,
    PROBE_MODES,
    PROBE_POSITIONS,
    AbliterationConfig,
)

D = AbliterationConfig()


def _flag(parser, *names, key=None, **kwargs):
    # SUPPRESS: only flags the user typed reach the namespace, so a --config
    # file's values are overridden by the command line and by nothing else.
    parser.add_argument(*names, default=argparse.SUPPRESS, **kwargs)


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """Every setting of ``AbliterationConfig`` as ``run``'s flag: the schema config files and the GUI are checked by."""
    add_model_options(parser)
    add_dataset_options(parser)
    add_probe_options(parser)
    add_ablation_options(parser)
    add_eval_options(parser)
    parser.add_argument(
        "--dry-run",
        action="store_true",
        default=argparse.SUPPRESS,
        help="probe, choose the layer and print the per-layer stats; no evaluation, writes nothing",
    )


def add_output_style(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("output")
    group.add_argument("--quiet", action="store_true", help="print only errors and the final result")
    group.add_argument("--json", action="store_true", help="print events as JSON lines on stdout (for scripts)")
    group.add_argument(
        "--log-file",
        help="JSON-lines log file (default: ~/.mlx-llm/abliteration-toolkit-cli/log.jsonl or $MLX_ABLITERATION_LOG_FILE)",
    )


def add_model_options(parser: argparse.ArgumentParser, output: bool = True) -> None:
    _flag(
        parser, "-m", "--model", required=False, help="model: local MLX/HF dir, a .gguf file, or a Hugging Face hub id"
    )
    if output:
        _flag(
            parser,
            "-o",
            "--output-dir",
            help="where to write the abliterated model (must not exist or be empty, unless --overwrite)",
        )
        _flag(parser, "--overwrite", action="store_true", help="replace a non-empty output dir")
    _flag(
        parser, "--cache-dir", help="cache for hub downloads and GGUF conversions (default: ~/.cache/mlx-abliteration)"
    )
    _flag(
        parser,
        "--config",
        dest="config_file",
        help="YAML or TOML file with settings (keys as the long flags); flags override it",
    )


def add_dataset_options(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("prompts")
    _flag(
        g,
        "--harmful-dataset",
        help="harmful prompts: .jsonl/.json/.csv/.txt/.parquet file or hub dataset id (default: packaged set)",
    )
    _flag(g, "--harmless-dataset", help="harmless prompts, same formats (default: packaged set)")
    _flag(
        g, "--dataset-column", help="column/field holding the prompt (default: prompt, text, instruction or messages)"
    )
    _flag(g, "--max-prompts", type=int, help=f"prompts per kind used for probing (default: {D.max_prompts})")
    _flag(g, "--system-prompt", help="system prompt for every chat (default: the chat template's own)")
    _flag(g, "--seed", type=int, help=f"seed for shuffling and the train/eval split (default: {D.seed})")
    _flag(
        g,
        "--eval-size",
        type=int,
        help=f"held-out prompts per kind, reserved for evaluation even when it is skipped (default: {D.eval_size})",
    )


def add_probe_options(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("probing and direction")
    _flag(g, "--layers", help="layers to probe/consider: all, 10-20, 4,8,12, -8--1 or fractions 0.4-0.8 (default: all)")
    _flag(
        g,
        "--use-layer",
        help="layer whose direction is used: auto, an index (negative from the end) or a fraction like 0.6 (default: auto)",
    )
    _flag(
        g,
        "--probe-position",
        choices=PROBE_POSITIONS,
        help="where activations are read: last prompt token, the end-of-turn marker, the token after it, or the mean from the marker to the end (default: last)",
    )
    _flag(
        g,
        "--probe-marker",
        help="marker string for marker positions (default: end-of-turn token from the chat template)",
    )
    _flag(
        g,
        "--strip-marker-newline",
        action="store_true",
        help="drop one trailing newline from the marker before searching for it",
    )
    _flag(
        g,
        "--direction-variant",
        choices=DIRECTION_VARIANTS,
        help="mean-diff; projected: remove the direction's component along the harmless mean; biprojected: also, for each edited layer, along that layer's harmless mean (one direction per edited layer) (default: mean-diff)",
    )
    _flag(
        g,
        "--batch-size",
        type=int,
        help="prompts per forward pass (default: the probe chooses from prompt lengths; "
        f"evaluation and the layer choice take up to {GENERATION_BATCH_SIZE})",
    )
    _flag(
        g,
        "--probe-mode",
        choices=PROBE_MODES,
        help="memory: load the model; streamed: load one decoder layer at a time, for models larger than memory (skips evaluation; --use-layer auto picks by separation) (default: memory)",
    )


def add_direction_options(parser: argparse.ArgumentParser) -> None:
    """The direction file a saved plan is applied from (``ablate``, ``export-adapter``)."""
    parser.add_argument("--direction", required=True, help="refusal_direction.safetensors file (or a dir holding one)")
    parser.add_argument(
        "--use-layer", default=None, help="use this probed layer's direction instead of the file's chosen layer"
    )


def add_ablation_options(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("ablation")
    _flag(
        g,
        "--ablation-strength",
        type=_float,
        help=f"s in W' = W - s r r^T W, between 0 and {MAX_STRENGTH:g}; 1 removes the direction (default: {D.ablation_strength})",
    )
    _flag(
        g,
        "--ablate-layers",
        help="layers whose writers are edited: same syntax as --layers, or separated[:F], the probed layers whose "
        "harmful/harmless separation is at least F (default 0.5) times the largest (default: all)",
    )
    _flag(
        g,
        "--targets",
        nargs="+",
        help="edit only the residual writers whose module path ends with one of these names, e.g. o_proj down_proj (default: every writer found on the model's forward pass; a name matching no writer is an error)",
    )
    _flag(
        g,
        "--norm-preserve",
        action="store_true",
        help="magnitude-preserving ablation: edited vectors keep their norms (MPOA-style)",
    )
    _flag(
        g,
        "--edited-precision",
        choices=EDITED_PRECISIONS,
        help="keep: requantize edited quantized matrices; else store them unquantized in this dtype (default: keep)",
    )
    _flag(
        g,
        "--quantize",
        choices=("4", "8", "mxfp4"),
        help="write the abliterated model quantized like mlx_lm.convert -q (the edit is made in full precision first; a quantized source is dequantized and requantized)",
    )
    _flag(g, "--q-group-size", type=int, help="group size for --quantize 4/8 (default: 64; mxfp4 always 32)")


def add_eval_options(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("evaluation")
    _flag(
        g, "--eval-max-tokens", type=int, help=f"tokens generated per evaluation answer (default: {D.eval_max_tokens})"
    )
    _flag(
        g,
        "--kl-tokens",
        type=int,
        help=f"tokens of the original's greedy answer over which KL is averaged (default: {D.kl_tokens})",
    )
    _flag(
        g,
        "--capability-questions",
        type=int,
        help=f"short factual/arithmetic questions with exact answers asked before and after; reports the share the original got right that the edited model still gets right; 0 skips (default: {D.capability_questions})",
    )
    _flag(g, "--judge", metavar="keywords|MODEL", help=JUDGE_HELP + f" (default: {D.judge})")
    _flag(g, "--no-eval", action="store_true", help="skip the before/after evaluation")
    _flag(
        g,
        "--no-cache",
        action="store_true",
        help="evaluate the original model again instead of reading its cached evaluation (kept under the cache dir, keyed by the weights, prompts and every evaluation setting)",
    )


JUDGE_HELP = (
    "who decides what is a refusal: keywords (the refusal-marker list), or MODEL, a local chat model (dir, .gguf "
    "or hub id, resolved like -m) that also reads every (prompt, answer) pair and classifies it with a fixed "
    "rubric (complies, warns then complies, partial refusal, refuses, evades, empty). Its verdicts are calibrated "
    "on the shipped hand-labelled answers at first use (cached per judge): one it is not sure of is 'undecided', "
    "never a refusal; the report shows the keyword and judge counts, the undecided count, their agreement and "
    "the judge's measured precision/recall. The judge is loaded only while it judges; on the CPU it "
    "costs about one forward pass of its size per answer; in `search` every trial is scored by it (slower)"
)


def _float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
