"""Where a run's edit plan comes from: one probed layer (run), a direction file (ablate) or a plan spec (run --plan-json); the search adds its trials."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from mlx_abliteration.config.defaults import AbliterationConfig
from mlx_abliteration.errors import UserError
from mlx_abliteration.pipeline.events import Reporter

if TYPE_CHECKING:
    from mlx_abliteration.pipeline.steps import PromptSets
    from mlx_abliteration.probe.directions import RefusalDirections
import shlex
from dataclasses import fields

from mlx_abliteration.edit.strength_schedule import PlanSpec, kernel_plan
from mlx_abliteration.io.model_io import read_config
from mlx_abliteration.pipeline import steps
from mlx_abliteration.probe.directions import load_directions, parse_use_layer


@dataclass
class RunContext:
    """What a plan source sees: the settings, the reporter, the resolved model and what was loaded."""

    config: AbliterationConfig
    report: Reporter
    source: Path
    model: object = None  # None when the plan source never loads the model (ablate)
    tokenizer: object = None
    model_config: dict = field(default_factory=dict)
    writers: dict | None = None  # the residual writers, found right after load
    data: PromptSets | None = None  # when the model is loaded

    def prompt_sets(self) -> PromptSets:
        """The prompts; read right after the model is loaded (a plan source that never loads it has none)."""
        if self.data is None:
            raise RuntimeError("no prompts: they are read once the model is loaded")
        return self.data


@dataclass
class PlanChoice:
    """The edit to make: the plan, the layer its direction comes from, and what the log records about the choice."""

    layer: int
    plan: object  # engine.orthogonalize.AblationPlan
    candidates: list = field(default_factory=list)  # auto layer scores
    record: dict = field(default_factory=dict)  # entries added to abliteration_log.json


class PlanSource:
    """Where the edit plan comes from. ``run_pipeline`` calls, in order: ``check(config)`` before any work,
    ``prepare(ctx)`` once the model is resolved (before it is loaded), ``directions(ctx)`` once the
    writers are found and the prompts read, and ``choose(ctx, directions)``: a ``PlanChoice``, or None
    when there is nothing to evaluate or save (a search without -o)."""

    loads_model = True  # False: the model is never loaded (writers found lazily, edited while saving)
    output_optional = False  # True: without -o the flow still runs (search) instead of failing

    def inputs(self) -> list:
        """Input files besides the model and datasets (an output may never be one of them)."""
        return []

    def check(self, config: AbliterationConfig) -> None:
        pass

    def prepare(self, ctx: RunContext) -> None:
        pass

    def directions(self, ctx: RunContext) -> RefusalDirections:
        return steps.probe_directions(ctx.model, ctx.tokenizer, ctx.prompt_sets(), ctx.config, ctx.report, ctx.source)

    def choose(self, ctx: RunContext, directions: RefusalDirections) -> PlanChoice | None:
        raise NotImplementedError


class LayerChoice(PlanSource):
    """``run``: one probed layer's direction (``--use-layer``: an index, a fraction or ``auto``), uniform strength."""

    def choose(self, ctx: RunContext, directions: RefusalDirections) -> PlanChoice:
        layer, candidates = steps.choose_layer(
            ctx.model, ctx.tokenizer, directions, ctx.prompt_sets(), ctx.config, ctx.source, ctx.report, ctx.writers
        )
        return PlanChoice(layer, steps.build_plan(directions, layer, ctx.config, ctx.writers), candidates)


class DirectionFile(PlanSource):
    """``ablate``: a saved direction file (its chosen layer, or ``use_layer``); no probing, no evaluation,
    and the model is never loaded: writers are found one layer at a time and weights edited while saving."""

    loads_model = False

    def __init__(self, path: str | Path, use_layer: str | None = None):
        self.path, self.use_layer = path, use_layer
        self.loaded: tuple[RefusalDirections, int] | None = None  # set by check()

    def inputs(self) -> list:
        return [self.path]

    def check(self, config: AbliterationConfig) -> None:
        directions, layer = load_directions(self.path)
        if self.use_layer is not None:
            chosen = parse_use_layer(self.use_layer, directions.num_model_layers)
            if not isinstance(chosen, int) or chosen not in directions.layers:  # "auto" or not probed
                raise UserError(
                    f"--use-layer {self.use_layer}: choose one of the probed layers {directions.layers[0]}..{directions.layers[-1]}"
                )
            layer = chosen
        self.loaded = directions, layer

    def _loaded(self) -> tuple[RefusalDirections, int]:
        if self.loaded is None:
            raise RuntimeError("DirectionFile.check() loads the direction file first")
        return self.loaded

    def prepare(self, ctx: RunContext) -> None:
        """The file against the model's config, before the model is read (``ablate`` and ``export-adapter``);
        each edited module's shape is checked again where it is edited (``edit.orthogonalize.check_shape``)."""
        directions = self._loaded()[0]
        config = read_config(ctx.source)
        num_layers = config.get("num_hidden_layers")
        if num_layers is not None and num_layers != directions.num_model_layers:
            raise UserError(
                f"the direction file was made for a {directions.num_model_layers}-layer model, but {ctx.source} has {num_layers} layers"
            )
        text = config.get("text_config")
        hidden = (text if isinstance(text, dict) and "hidden_size" in text else config).get("hidden_size")
        size = directions.directions.shape[-1]
        if isinstance(hidden, int) and hidden != size:
            raise UserError(
                f"the direction file holds directions of size {size}, but {ctx.source} has hidden size {hidden}; "
                "the direction does not belong to this model"
            )

    def directions(self, ctx: RunContext) -> RefusalDirections:
        return self._loaded()[0]

    def choose(self, ctx: RunContext, directions: RefusalDirections) -> PlanChoice:
        layer = self._loaded()[1]
        plan = steps.build_plan(directions, layer, ctx.config, ctx.writers)
        return PlanChoice(layer, plan, record={"command": "ablate", "direction_file": str(self.path)})


def spec_choice(ctx: RunContext, directions, spec: PlanSpec, record: dict | None = None) -> PlanChoice:
    """The plan of a ``PlanSpec`` on the model's writers; its nearest probed layer names it in the log."""
    plan = kernel_plan(directions, spec, ctx.config.targets).with_writers(ctx.writers)
    layer = min(directions.layers, key=lambda p: (abs(p - spec.direction_index), p))
    extra = {"plan_spec": spec.to_dict(), **(record or {}), "reproduce": reproduce_command(ctx.config)}
    return PlanChoice(layer, plan, record=extra)


class PlanFile(PlanSource):
    """``run --plan-json``: an explicit plan spec (a JSON file, or the ``abliteration_log.json`` of a search)."""

    def __init__(self, spec: PlanSpec):
        self.spec = spec

    def choose(self, ctx: RunContext, directions) -> PlanChoice:
        return spec_choice(ctx, directions, self.spec)


_NOT_FOR_PLAN = {"model", "output_dir", "overwrite", "dry_run", "use_layer", "ablation_strength", "ablate_layers"}


def reproduce_command(config: AbliterationConfig) -> str:
    """The ``run --plan-json`` command line that rebuilds the same weights (settings that differ from the defaults)."""
    defaults = AbliterationConfig()
    out = str(config.output_dir or "OUT")
    parts = [
        "mlx-abliterate",
        "run",
        "-m",
        config.model,
        "-o",
        f"{out}-reproduced",
        "--plan-json",
        f"{out}/abliteration_log.json",
    ]
    for f in fields(AbliterationConfig):
        value = getattr(config, f.name)
        if f.name in _NOT_FOR_PLAN or value == getattr(defaults, f.name):
            continue
        flag = "--" + f.name.replace("_", "-")
        if isinstance(value, bool):
            parts += [flag] if value else []
        elif isinstance(value, (list, tuple)):
            parts += [flag, *map(str, value)]
        else:
            parts += [flag, str(value)]
    return shlex.join(parts)
