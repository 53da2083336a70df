"""Every pipeline parameter, its default and its value rules, in one place (CLI, GUI, config files, library).

A config is checked when it is built (``__post_init__``): however it was made, a run never starts
with a count, strength, mode or quantization it cannot use. Types and choices of values that arrive as
text or untyped data are checked against the flags first (``schema.build_config``)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mlx_abliteration.errors import UserError

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

# Residual writers are found on the model itself (core.writers). --targets
# narrows the edit to writers whose module path ends with one of its names;
# empty: every writer found.
DEFAULT_TARGETS: tuple[str, ...] = ()
# Names offered as --targets choices in the GUI (the common writer names).
COMMON_TARGETS: tuple[str, ...] = ("o_proj", "down_proj", "embed_tokens")
MAX_STRENGTH = 10.0  # --ablation-strength upper bound (1 removes the direction; larger flips it)
# memory: load the model and probe it; streamed: read one decoder layer at a
# time from the shards (models larger than memory; no evaluation, layer by stats).
PROBE_MODES: tuple[str, ...] = ("memory", "streamed")
# --edited-precision values: keep requantizes edited quantized matrices, a dtype stores them unquantized.
# Rows decoded together in evaluation. A decoding step reads every weight
# once, so fuller steps cost less per token: on a 2-core CPU (Qwen2.5-1.5B,
# float32) a step took 0.48 s for 1 row, 1.12 s for 32, 1.53 s for 64, and
# the original's evaluation 387 s at 32 vs 288 s at 64 (same answers).
GENERATION_BATCH_SIZE = 64
# Tokens per answer to the capability questions (core.capability): short exact answers.
CAPABILITY_MAX_TOKENS = 24
EDITED_PRECISIONS: tuple[str, ...] = ("keep", "float16", "bfloat16", "float32")
PROBE_POSITIONS: tuple[str, ...] = ("last", "marker", "after-marker", "span")
# projected: the direction loses its component along its own layer's harmless mean; biprojected: also
# along each *edited* layer's harmless mean (after jim-plus's biprojection), one direction per edited layer.
DIRECTION_VARIANTS: tuple[str, ...] = ("mean-diff", "projected", "biprojected")


SEPARATED = "separated"  # --ablate-layers separated[:F]: the layers where harmful and harmless separate
DEFAULT_SEPARATION_SHARE = 0.5


def separation_share(text: str | None) -> float | None:
    """F of ``separated[:F]`` (0 < F <= 1; default 0.5), or None for a plain layer list; a bad F is a
    one-line error."""
    name, _, value = str(text or "").strip().lower().partition(":")
    if name != SEPARATED:
        return None
    try:
        share = float(value) if value else DEFAULT_SEPARATION_SHARE
    except ValueError:
        share = float("nan")
    if not 0 < share <= 1:
        raise UserError(f"--ablate-layers {text}: F in separated:F must be a number in (0, 1], e.g. separated:0.5")
    return share


@dataclass
class AbliterationConfig:
    """Parameters of ``mlx-abliterate run`` (and the GUI); see ``--help`` for each."""

    model: str = ""
    output_dir: str | None = None
    harmful_dataset: str | None = None  # None: the packaged default set
    harmless_dataset: str | None = None
    dataset_column: str | None = None
    cache_dir: str | None = None
    layers: str = "all"  # which layers are probed / considered
    use_layer: str = "auto"
    probe_position: str = "last"
    probe_marker: str | None = None
    strip_marker_newline: bool = False
    direction_variant: str = "mean-diff"
    ablation_strength: float = 1.0
    ablate_layers: str = "all"
    targets: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))
    norm_preserve: bool = False
    edited_precision: str = "keep"
    quantize: str | None = (
        None  # None: keep the source's precision; 4, 8 or mxfp4: quantize the output (core.quantize_output)
    )
    q_group_size: int | None = None  # None: 64 (affine), 32 (mxfp4)
    batch_size: int | None = None  # None: chosen from prompt lengths
    probe_mode: str = "memory"  # memory, or streamed: one decoder layer in memory at a time
    max_prompts: int = 128  # probing prompts per kind
    eval_size: int = 64  # held-out evaluation prompts per kind (n=32 moved the measured rate by +-7 points)
    eval_max_tokens: int = 64
    kl_tokens: int = 1
    capability_questions: int = 32  # short exact-answer questions asked before and after (0: skip)
    judge: str = "keywords"  # refusal verdicts: the marker list alone, or also a local chat model (core.judge)
    no_eval: bool = False
    no_cache: bool = False  # recompute the original model's evaluation instead of reading it from the cache
    system_prompt: str | None = None
    seed: int = 42
    overwrite: bool = False
    dry_run: bool = False

    def __post_init__(self) -> None:
        _check_counts(self)
        if self.probe_mode not in PROBE_MODES:
            raise UserError(f"unknown probe mode {self.probe_mode!r}; choose one of {', '.join(PROBE_MODES)}")
        check_strength(self.ablation_strength)
        separation_share(self.ablate_layers)
        self.quantization()

    @property
    def streamed(self) -> bool:
        """Probe one decoder layer at a time from the shards (``--probe-mode streamed``)."""
        return self.probe_mode == "streamed"

    def quantization(self) -> dict | None:
        """``{"bits", "group_size", "mode"}`` of ``--quantize`` / ``--q-group-size``; None without ``--quantize``."""
        if self.quantize is None:
            if self.q_group_size is not None:
                raise UserError("--q-group-size needs --quantize 4, 8 or mxfp4")
            return None
        return quant_spec(self.quantize, self.q_group_size)

    def to_dict(self) -> dict:
        return asdict(self)


def check_count(flag: str, value: Any, least: int = 1) -> None:
    """A count setting: an integer (not a bool) of at least ``least``; the one wording of every command."""
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise UserError(f"{flag} must be an integer of at least {least} (got {value!r})")


def _check_counts(config: AbliterationConfig) -> None:
    for name in ("max_prompts", "eval_size", "eval_max_tokens", "kl_tokens", "capability_questions"):
        check_count(
            f"--{name.replace('_', '-')}",
            getattr(config, name),
            0 if name in ("eval_size", "capability_questions") else 1,
        )
    if config.batch_size is not None:
        check_count("--batch-size", config.batch_size)


def load_config_file(path: str | Path) -> dict:
    """Settings from a YAML or TOML file (keys as in ``AbliterationConfig``; '-' allowed)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file {path} does not exist; pass a YAML or TOML file")
    text = path.read_text()
    try:
        if path.suffix.lower() == ".toml":
            data = tomllib.loads(text)
        else:
            data = yaml.safe_load(text) or {}
    except ValueError as err:  # tomllib.TOMLDecodeError is a ValueError
        raise UserError(f"cannot parse config file {path}: {str(err).splitlines()[0]}") from err
    except Exception as err:
        if not isinstance(err, yaml.YAMLError):
            raise
        raise UserError(f"cannot parse config file {path}: {str(err).splitlines()[0]}") from err
    if not isinstance(data, dict):
        raise UserError(f"config file {path} must hold a mapping of settings, not {type(data).__name__}")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


@dataclass
class SearchSettings:
    """Settings of ``mlx-abliterate search`` beyond the pipeline's."""

    n_trials: int = (
        24  # total finished (complete or stopped-early) trials in the study; a rerun runs only the missing ones
    )
    n_startup_trials: int = 8  # random trials before TPE models the results
    max_kl: float = 0.1  # the saved trial: fewest refusals among trials with KL <= this
    search_prompts: int = 32  # prompts per kind scoring each trial (disjoint from probing and held-out eval)
    # prompts per kind on which the best trials and the fixed default are scored again to choose the saved
    # trial (disjoint from the scoring split too; 0: choose on the scoring split)
    validation_prompts: int = 64
    search_max_tokens: int = 32  # tokens generated per harmful prompt in a trial (stops at a refusal)
    search_seed: int | None = None  # None: the pipeline's --seed
    study_dir: str | None = None  # None: <cache dir>/studies
    study_name: str | None = None  # None: derived from the model and every setting that changes the scores
    trial: int | None = None  # save this finished trial instead of running more
    warm_start: bool = True  # trials 0 and 1: the fixed plan of `run`, without and with --norm-preserve
    prune: bool = True  # stop a trial as soon as a finished one dominates it (KL first, then refusals so far)

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        for name in ("n_trials", "search_prompts", "search_max_tokens"):
            check_count(f"--{name.replace('_', '-')}", getattr(self, name))
        check_count("--validation-prompts", self.validation_prompts, 0)
        check_count("--n-startup-trials", self.n_startup_trials, 0)
        if not self.max_kl > 0:
            raise UserError(f"--max-kl must be > 0 (got {self.max_kl})")

    def to_dict(self) -> dict:
        return asdict(self)


QUANTIZE_CHOICES = ("4", "8", "mxfp4")


DEFAULT_GROUP_SIZE = 64  # mlx_lm.convert's default for affine 4/8-bit


MXFP4_GROUP_SIZE = 32  # the only group size the mxfp4 format has


def quant_spec(quantize: str, group_size: int | None = None) -> dict:
    """``{"bits", "group_size", "mode"}`` for ``--quantize`` / ``--q-group-size`` (one-line errors)."""
    quantize = str(quantize)
    if quantize not in QUANTIZE_CHOICES:
        raise UserError(f"--quantize {quantize}: choose one of {', '.join(QUANTIZE_CHOICES)}")
    if quantize == "mxfp4":
        if group_size not in (None, MXFP4_GROUP_SIZE):
            raise UserError(f"--quantize mxfp4 uses groups of {MXFP4_GROUP_SIZE}; drop --q-group-size {group_size}")
        return {"bits": 4, "group_size": MXFP4_GROUP_SIZE, "mode": "mxfp4"}
    group_size = DEFAULT_GROUP_SIZE if group_size is None else group_size
    if group_size not in (32, 64, 128):
        raise UserError(f"--q-group-size {group_size}: choose 32, 64 or 128")
    return {"bits": int(quantize), "group_size": group_size, "mode": "affine"}


def check_strength(strength: Any) -> float:  # any value from a CLI flag or a plan file
    try:
        value = float(strength)
    except (TypeError, ValueError):
        raise UserError(f"ablation strength {strength!r} is not a number; use e.g. 1.0") from None
    if not 0 <= value <= MAX_STRENGTH:  # also false for NaN
        raise UserError(
            f"ablation strength {strength!r} must be between 0 and {MAX_STRENGTH:g} (1.0 removes the direction)"
        )
    return value
