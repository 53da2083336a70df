"""The pipeline's steps, each a short function over the config and a reporter."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, replace
from pathlib import Path

import mlx.core as mx

from mlx_abliteration.config.defaults import GENERATION_BATCH_SIZE, AbliterationConfig
from mlx_abliteration.data.chat import template_check
from mlx_abliteration.data.prompt_selection import select_prompts
from mlx_abliteration.edit.in_memory import apply_plan
from mlx_abliteration.edit.orthogonalize import AblationPlan, select_writers, uniform_plan
from mlx_abliteration.errors import UserError
from mlx_abliteration.evaluation.baseline_cache import cached_baseline
from mlx_abliteration.evaluation.evaluate import eval_settings, evaluate_model, evaluate_original
from mlx_abliteration.evaluation.judge import judge_identity, resolve_judge
from mlx_abliteration.evaluation.judge_quality import judge_reports
from mlx_abliteration.evaluation.layer_selection import select_layer_auto
from mlx_abliteration.evaluation.refusals import DEFAULT_REFUSAL_MARKERS
from mlx_abliteration.export.model_card import model_card
from mlx_abliteration.export.quantize import save_quantized_model
from mlx_abliteration.export.save import save_ablated_model, validate_output_dir
from mlx_abliteration.export.source_layout import discover_writers_in_dir
from mlx_abliteration.io.asset_resolver import resolve_asset
from mlx_abliteration.io.model_io import check_model_dir, load_model, read_config
from mlx_abliteration.io.output_dir import check_cache_dir, check_output_dir, local_sources
from mlx_abliteration.pipeline.records import RESPONSES_FILE
from mlx_abliteration.probe.directions import (
    RefusalDirections,
    ablate_layer_list,
    compute_directions,
    direction_file_contents,
    parse_layer_list,
    parse_use_layer,
)
from mlx_abliteration.probe.distributed import is_primary, probe_prompts_distributed
from mlx_abliteration.probe.positions import ProbeSpec
from mlx_abliteration.probe.streamed import select_layer_by_separation, streamed_probe
from mlx_abliteration.probe.writer_discovery import model_writers
from mlx_abliteration.probe.writers import describe_writers
from mlx_abliteration.runtime.backend import blas_info

AUTO_PROMPTS = 16  # prompts per kind used to score candidate layers


@dataclass
class PromptSets:
    harmful_train: list[str]
    harmless_train: list[str]
    harmful_eval: list[str]
    harmless_eval: list[str]


def resolve_model(config: AbliterationConfig, report, extra_sources=()) -> Path:
    """The model's local dir (hub download or GGUF conversion into the cache), after checking the paths
    (``extra_sources``: more input files, e.g. ``ablate``'s direction file, that no output may replace)."""

    if not config.model:
        raise UserError("no model given; pass -m/--model with a model dir, a .gguf file or a hub id")
    check_paths(config, extra_sources)
    report.emit("stage", f"resolving model {config.model}")
    source = Path(resolve_asset(config.model, Path(config.cache_dir) if config.cache_dir else None))
    return check_model_dir(source)


def check_paths(config: AbliterationConfig, extra_sources=()) -> None:
    """Before any work: the cache dir is usable, and the output (if any) is writable and is
    none of the paths the user named as input (the model dir or .gguf file, the datasets)."""

    check_cache_dir(config.cache_dir)
    if config.output_dir and not config.dry_run:
        sources = local_sources(config.model, config.harmful_dataset, config.harmless_dataset, *extra_sources)
        check_output_dir(config.output_dir, sources=sources, overwrite=config.overwrite)


def check_output(source: Path, config: AbliterationConfig) -> None:
    """Again once the model is resolved (a hub download or GGUF conversion lives in the cache)."""
    validate_output_dir(source, Path(config.output_dir), config.overwrite, fresh=False)


def load(source: Path, report, config: AbliterationConfig | None = None, chat: bool = True):
    """The model, its tokenizer and config; ``chat``: its chat template is checked before the weights are read
    (every prompt goes through it; ``export-adapter`` reads none)."""
    streamed = config is not None and config.streamed
    report.emit(
        "stage",
        f"{'opening (lazily)' if streamed else 'loading'} {source}",
        blas=blas_info(),
        device=str(mx.default_device()),
    )
    check = template_check(str(config.model if config else source), config.system_prompt if config else None)
    return load_model(source, lazy=streamed, check_tokenizer=check if chat else None)


def prompts(config: AbliterationConfig, report) -> PromptSets:
    cache = Path(config.cache_dir) if config.cache_dir else None
    # The held-out prompts are reserved even with --no-eval (or `probe`), so the
    # probing set, and so the weights, never depend on whether evaluation runs.
    n_eval = config.eval_size
    sets = {}
    for kind, source in (("harmful", config.harmful_dataset), ("harmless", config.harmless_dataset)):
        sets[kind] = select_prompts(
            source,
            kind,
            config.max_prompts,
            n_eval,
            config.seed,
            cache,
            config.dataset_column,
            source or f"default {kind}",
        )
    data = PromptSets(sets["harmful"][0], sets["harmless"][0], sets["harmful"][1], sets["harmless"][1])
    report.emit(
        "info",
        f"prompts: {len(data.harmful_train)}+{len(data.harmless_train)} for probing, "
        f"{len(data.harmful_eval)}+{len(data.harmless_eval)} held out for evaluation",
    )
    return data


def _eval_batch(config: AbliterationConfig) -> int:
    return config.batch_size or GENERATION_BATCH_SIZE


def run_eval_settings(config: AbliterationConfig) -> dict:
    """``eval_settings`` of a run: its config's evaluation flags, the markers and the judge's identity."""
    return eval_settings(
        max_tokens=config.eval_max_tokens,
        kl_tokens=config.kl_tokens,
        batch_size=_eval_batch(config),
        system_prompt=config.system_prompt,
        markers=DEFAULT_REFUSAL_MARKERS,
        capability_questions=config.capability_questions,
        judge=judge_identity(judge_path(config)),
    )


def judge_path(config: AbliterationConfig, check: bool = False) -> Path | None:
    """``--judge``'s model dir, None for keywords (a bad value: a one-line error; ``run_pipeline`` asks first,
    with ``check``: the judge's tokenizer and chat template too, before any work)."""

    return resolve_judge(config.judge, config.cache_dir, check)


def judge_step(eval_report, config: AbliterationConfig, report, which: str) -> None:
    """With ``--judge MODEL``: load the judge, add its verdicts to ``eval_report``, free it."""
    path = judge_path(config)
    if path is None or eval_report is None:
        return

    report.emit("stage", f"judging the {which} model's answers with {config.judge}")
    judge_reports(
        [eval_report],
        path,
        config.judge,
        cache_dir=config.cache_dir,
        progress=report.progress,
        emit=lambda line: report.emit("info", line),
    )


def evaluate_before(model, tokenizer, data: PromptSets, config: AbliterationConfig, report, source: Path | None = None):
    """The original model's evaluation: from the baseline cache (keyed by ``source``'s weights, the
    prompts and every evaluation setting) unless ``--no-cache``, else computed and cached."""
    if config.no_eval or not data.harmful_eval:
        return None, None
    if config.streamed:
        report.emit("info", "--probe-mode streamed never loads the whole model: evaluation is skipped")
        return None, None

    settings = run_eval_settings(config)

    def compute():
        report.emit("stage", "evaluating the original model")
        result = evaluate_original(model, tokenizer, data.harmful_eval, data.harmless_eval, settings, report.progress)
        judge_step(result[1], config, report, "original")  # cached with the judge's verdicts
        return result

    if source is None:
        reference, before = compute()
    else:
        reference, before, hit = cached_baseline(
            source,
            data.harmful_eval,
            data.harmless_eval,
            settings,
            compute,
            cache_dir=config.cache_dir,
            use_cache=not config.no_cache,
            emit=lambda message: report.emit("info", message),
        )
    report.emit("eval", "original model", which="before", report=before.to_dict())
    return reference, before


def probe_spec(config: AbliterationConfig) -> ProbeSpec:
    return ProbeSpec(config.probe_position, config.probe_marker, config.strip_marker_newline, config.system_prompt)


def probe_directions(
    model, tokenizer, data: PromptSets, config: AbliterationConfig, report, source: Path | None = None
) -> RefusalDirections:
    num_layers = len(model.layers)
    layers = parse_layer_list(config.layers, num_layers)
    spec = probe_spec(config)
    report.emit("stage", f"probing {len(layers)} layers at position '{spec.position}'")
    started = time.perf_counter()
    if config.streamed:
        sets = [data.harmful_train, data.harmless_train]
        harmful, harmless = streamed_probe(source, sets, spec, layers, config.batch_size, report.progress)
    else:
        probe = probe_prompts_distributed  # plain probe_prompts in one process
        harmful = probe(
            model, tokenizer, data.harmful_train, spec, layers, config.batch_size, report.progress, "probe harmful"
        )
        harmless = probe(
            model, tokenizer, data.harmless_train, spec, layers, config.batch_size, report.progress, "probe harmless"
        )
    seconds = time.perf_counter() - started
    directions = compute_directions(harmful, harmless, layers, num_layers, config.direction_variant)
    report.emit("info", f"probed {harmful.count + harmless.count} prompts in {seconds:.1f}s", probe_seconds=seconds)
    return directions


def choose_layer(
    model,
    tokenizer,
    directions: RefusalDirections,
    data: PromptSets,
    config: AbliterationConfig,
    source: Path,
    report,
    writers,
):
    choice = parse_use_layer(config.use_layer, directions.num_model_layers)
    if choice != "auto":
        if choice in directions.degenerate:
            raise UserError(
                f"--use-layer {config.use_layer}: the harmful and harmless activations are identical at layer {choice}; choose another layer"
            )
        if choice not in directions.layers:
            raise UserError(
                f"--use-layer {config.use_layer} selects layer {choice}, which was not probed (--layers {config.layers})"
            )
        report.emit("layers", f"using layer {choice}", stats=[s.to_dict() for s in directions.stats], chosen=choice)
        return choice, []
    if config.streamed:
        layer = select_layer_by_separation(directions)
        report.emit(
            "layers",
            f"auto-selected layer {layer} by separation (streamed mode runs no forward passes to score layers)",
            stats=[s.to_dict() for s in directions.stats],
            chosen=layer,
        )
        return layer, []

    report.emit("stage", "choosing the layer (auto)")
    layer, scores = select_layer_auto(
        model,
        tokenizer,
        directions,
        lambda layer: build_plan(directions, layer, config, writers),
        data.harmful_train[:AUTO_PROMPTS],
        data.harmless_train[:AUTO_PROMPTS],
        system_prompt=config.system_prompt,
        batch_size=_eval_batch(config),
        progress=report.progress,
        storage_dtype=storage_dtype(source),
    )
    report.emit(
        "layers",
        f"auto-selected layer {layer}",
        stats=[s.to_dict() for s in directions.stats],
        chosen=layer,
        candidates=[s.to_dict() for s in scores],
    )
    return layer, scores


def find_writers(model, source: Path, config: AbliterationConfig, report):
    """The model's residual writers (found and proven on its forward pass), narrowed by ``--targets``.

    Runs before any probing, so an unsupported architecture or a wrong
    ``--targets`` fails in seconds with nothing written. Without a loaded
    ``model`` (or in streamed mode) the source is opened lazily and each
    layer's weights are dropped once tested.
    """

    report.emit("stage", "finding the residual writers")
    if model is None or config.streamed:
        writers = discover_writers_in_dir(source)
    else:
        writers = model_writers(model)
    chosen = select_writers(writers, config.targets)
    report.emit("info", describe_writers(chosen), writers=len(chosen))
    return chosen


def build_plan(directions: RefusalDirections, layer: int, config: AbliterationConfig, writers) -> AblationPlan:
    num_layers = directions.num_model_layers
    plan = uniform_plan(
        directions.direction(layer),
        num_layers,
        config.ablation_strength,
        ablate_layers=ablate_layer_list(config.ablate_layers, directions),
        targets=config.targets,
        norm_preserve=config.norm_preserve,
    )
    return replace(plan, layer_directions=directions.for_edited_layers(plan.layer_directions)).with_writers(writers)


def storage_dtype(source: Path):
    """dtype of the source's dense weights (so in-memory edits round like the saved ones)."""
    name = read_config(source).get("torch_dtype") or read_config(source).get("dtype")
    return {"bfloat16": mx.bfloat16, "float16": mx.float16, "float32": mx.float32}.get(str(name))


def evaluate_after(
    model, tokenizer, plan, data: PromptSets, reference, config: AbliterationConfig, source: Path, report
):
    if reference is None:
        return None

    report.emit("stage", "evaluating the abliterated model")
    apply_plan(model, plan, storage_dtype=storage_dtype(source), edited_precision=config.edited_precision)
    mx.clear_cache()  # the replaced writers' buffers (2.7 GB for a 1.5B model in float32) are not needed again
    after = evaluate_model(
        model,
        tokenizer,
        data.harmful_eval,
        data.harmless_eval,
        max_tokens=config.eval_max_tokens,
        batch_size=_eval_batch(config),
        system_prompt=config.system_prompt,
        reference_logprobs=reference,
        progress=report.progress,
        capability_questions=config.capability_questions,
    )
    judge_step(after, config, report, "abliterated")
    report.emit("eval", "abliterated model", which="after", report=after.to_dict())
    return after


def save(
    source: Path,
    config: AbliterationConfig,
    plan,
    directions,
    layer: int,
    record: dict,
    report,
    responses: str | None = None,
) -> tuple[str, dict]:
    """Write the model, ``abliteration_log.json``, the direction, the model card and the answers.

    Returns the output dir and the record as written (with the weights' digests and the edit summary).
    """

    if not is_primary():
        return config.output_dir, record  # under mlx.launch only rank 0 writes
    spec = config.quantization()
    report.emit("stage", f"saving to {config.output_dir}" + (f" (quantized: {config.quantize})" if spec else ""))
    common = dict(
        overwrite=config.overwrite,
        directions=direction_file_contents(directions, layer),
        progress=report.progress,
        extra_files={RESPONSES_FILE: responses} if responses else None,
    )
    if spec:
        record = {
            **record,
            "quantized_output": {**spec, "from_quantized_source": bool(read_config(source).get("quantization"))},
        }
        summary = save_quantized_model(
            source, config.output_dir, plan, spec, record=record, model_card=model_card(record), **common
        )
    else:
        summary = save_ablated_model(
            source,
            config.output_dir,
            plan,
            edited_precision=config.edited_precision,
            record=record,
            model_card=model_card(record),
            **common,
        )
    quantized = [r for r in summary["reports"] if r.quantized]
    if quantized:
        worst = max(r.residual for r in quantized)
        mean = sum(r.residual for r in quantized) / len(quantized)
        report.emit(
            "info",
            f"requantization keeps {mean:.1%} of the refusal component on average (worst {worst:.1%}); "
            "--edited-precision bfloat16 stores edited matrices unquantized",
            residual_mean=mean,
            residual_max=worst,
        )
    written = json.loads((Path(summary["output_dir"]) / "abliteration_log.json").read_text())
    return summary["output_dir"], written
