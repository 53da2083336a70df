"""The ``gr.Blocks`` layout: the Abliterate tab (form, live results) and the Compare tab."""

from __future__ import annotations

import threading
from pathlib import Path

import gradio as gr  # noqa: TID253  (the GUI module: imported only to run the GUI)

from mlx_abliteration.config.defaults import (
    COMMON_TARGETS,
    DIRECTION_VARIANTS,
    EDITED_PRECISIONS,
    PROBE_POSITIONS,
    AbliterationConfig,
)
from mlx_abliteration.evaluation.tables import EVAL_COLUMNS
from mlx_abliteration.gui.compare import compare_answers
from mlx_abliteration.gui.stream import RunView, run_abliteration_stream

D = AbliterationConfig()
COMPARE_MAX_TOKENS = 128
DATASET_FILE_TYPES = [".jsonl", ".json", ".csv", ".txt", ".parquet"]
CSS = """
.mla-progress progress { width: 70%; height: 1.1em; vertical-align: middle; }
#log textarea { font-family: ui-monospace, monospace; font-size: 12px; }
"""


def build_app(output_root: str | Path | None = None) -> gr.Blocks:
    """The whole app; ``launch()`` serves it. Runs write only inside ``output_root`` (default ``./outputs``)."""
    with gr.Blocks(title="MLX Abliteration", analytics_enabled=False) as app:
        gr.Markdown(
            "# MLX Abliteration\nRemove a chat model's refusal direction: probe harmful and harmless prompts, "
            "pick a layer, orthogonalize the residual-stream writers, evaluate before/after and save."
        )
        with gr.Tab("Abliterate"):
            with gr.Row():
                with gr.Column(scale=5):
                    form = _form()
                    with gr.Row():
                        start = gr.Button("Start abliteration", variant="primary", elem_id="start")
                        stop = gr.Button("Stop", variant="stop", elem_id="stop")
                with gr.Column(scale=6):
                    results = _results()
        with gr.Tab("Compare"):
            compare = _compare_tab()
        _wire(form, start, stop, results, compare, output_root)
    return app


def _form() -> dict[gr.components.Component, str]:
    """Input components, each mapped to its ``run_abliteration_stream`` keyword."""
    form: dict[gr.components.Component, str] = {}

    def add(name: str, component: gr.components.Component) -> gr.components.Component:
        form[component] = name
        return component

    add(
        "model",
        gr.Textbox(
            label="Model", placeholder="local MLX/HF model dir, a .gguf file, or a hub id (owner/name)", elem_id="model"
        ),
    )
    with gr.Row():
        add("harmful_dataset", _dataset_box("harmful"))
        add("harmless_dataset", _dataset_box("harmless"))
    with gr.Row():
        add("harmful_upload", _upload("harmful"))
        add("harmless_upload", _upload("harmless"))
    add(
        "output_dir",
        gr.Textbox(
            label="Output dir",
            placeholder="empty: outputs/<model name>-abliterated; a name like my_model goes inside the output root",
            elem_id="output-dir",
        ),
    )
    with gr.Row():
        add(
            "layers",
            gr.Textbox(D.layers, label="Layers to probe", info="all, 10-20, 4,8,12, -8--1, 0.4-0.8", elem_id="layers"),
        )
        add(
            "use_layer",
            gr.Textbox(
                D.use_layer,
                label="Layer index",
                info="auto, an index (negative from the end) or a fraction",
                elem_id="use-layer",
            ),
        )
        add(
            "ablation_strength",
            gr.Number(
                D.ablation_strength, label="Ablation strength", info="1 removes the direction", elem_id="strength"
            ),
        )
    add(
        "probe_marker",
        gr.Code(
            D.probe_marker or "",
            language=None,
            lines=1,
            max_lines=1,
            label="Probe marker (empty: end-of-turn marker from the chat template, or the last token)",
            elem_id="probe-marker",
        ),
    )
    add(
        "strip_marker_newline",
        gr.Checkbox(
            D.strip_marker_newline, label="Strip one trailing newline from the marker", elem_id="strip-newline"
        ),
    )
    with gr.Accordion("Advanced", open=False, elem_id="advanced"):
        _advanced(add)
    return form


def _dataset_box(kind: str) -> gr.Textbox:
    return gr.Textbox(
        label=f"{kind.capitalize()} prompts",
        placeholder=f"packaged default {kind} set",
        info="a .jsonl/.json/.csv/.txt/.parquet file or a hub dataset id; empty = the packaged default set",
        elem_id=f"{kind}-dataset",
    )


def _upload(kind: str) -> gr.File:
    return gr.File(
        label=f"…or upload {kind} prompts", file_types=DATASET_FILE_TYPES, height=140, elem_id=f"{kind}-upload"
    )


def _advanced(add) -> None:
    with gr.Row():
        add("probe_position", gr.Dropdown(list(PROBE_POSITIONS), value=D.probe_position, label="Probe position"))
        add(
            "direction_variant",
            gr.Dropdown(list(DIRECTION_VARIANTS), value=D.direction_variant, label="Direction variant"),
        )
        add(
            "edited_precision",
            gr.Dropdown(
                list(EDITED_PRECISIONS), value=D.edited_precision, label="Edited precision", info="keep = requantize"
            ),
        )
    with gr.Row():
        add("ablate_layers", gr.Textbox(D.ablate_layers, label="Ablate layers", info="layers whose writers are edited"))
        add("norm_preserve", gr.Checkbox(D.norm_preserve, label="Norm-preserving (MPOA-style) ablation"))
    add(
        "targets",
        gr.CheckboxGroup(
            list(COMMON_TARGETS),
            value=list(D.targets),
            label="Only these residual writers (none checked = every writer found)",
        ),
    )
    with gr.Row():
        add(
            "batch_size",
            gr.Number(
                D.batch_size or 0, precision=0, minimum=0, label="Batch size", info="0 = auto", elem_id="batch-size"
            ),
        )
        add(
            "max_prompts",
            gr.Number(D.max_prompts, precision=0, minimum=1, label="Max prompts per kind", elem_id="max-prompts"),
        )
        add(
            "eval_size",
            gr.Number(D.eval_size, precision=0, minimum=0, label="Eval prompts per kind", elem_id="eval-size"),
        )
        add(
            "eval_max_tokens",
            gr.Number(D.eval_max_tokens, precision=0, minimum=1, label="Eval max tokens", elem_id="eval-max-tokens"),
        )
        add("kl_tokens", gr.Number(D.kl_tokens, precision=0, minimum=1, label="KL tokens"))
        add("seed", gr.Number(D.seed, precision=0, label="Seed"))
    with gr.Row():
        add("no_eval", gr.Checkbox(D.no_eval, label="Skip evaluation"))
        add("overwrite", gr.Checkbox(D.overwrite, label="Overwrite output dir", elem_id="overwrite"))
        add("dry_run", gr.Checkbox(D.dry_run, label="Dry run (probe only, write nothing)"))
    add(
        "judge",
        gr.Textbox(
            D.judge,
            label="Refusal judge",
            info="keywords (the refusal markers), or a local chat model (dir, .gguf or hub id) that also judges every answer",
            elem_id="judge",
        ),
    )
    add(
        "system_prompt",
        gr.Textbox(D.system_prompt or "", label="System prompt", placeholder="empty: the chat template's own"),
    )
    with gr.Row():
        add(
            "dataset_column",
            gr.Textbox(
                D.dataset_column or "",
                label="Dataset column",
                placeholder="auto: prompt, text, instruction or messages",
            ),
        )
        add("cache_dir", gr.Textbox(D.cache_dir or "", label="Cache dir", placeholder="~/.cache/mlx-abliteration"))


def _results() -> RunView:
    status = gr.Markdown("Fill in a model and press **Start abliteration**.", elem_id="status")
    progress = gr.HTML("", elem_id="progress")
    metrics = gr.Dataframe(
        headers=list(EVAL_COLUMNS), label="Before / after (held-out prompts)", interactive=False, elem_id="metrics"
    )
    plot = gr.Plot(label="Refusal direction per layer", show_label=False, elem_id="layer-plot")
    output_path = gr.Textbox(label="Saved model", interactive=False, elem_id="output-path", buttons=["copy"])
    log = gr.Textbox(label="Log", lines=10, max_lines=18, autoscroll=True, interactive=False, elem_id="log")
    return RunView(status, progress, log, metrics, plot, output_path)


def _compare_tab() -> dict[str, gr.components.Component]:
    gr.Markdown("One prompt, answered greedily by both models through the chat template.")
    with gr.Row():
        original = gr.Textbox(label="Original model", elem_id="compare-original")
        abliterated = gr.Textbox(label="Abliterated model", elem_id="compare-abliterated")
    prompt = gr.Textbox(label="Prompt", lines=2, elem_id="compare-prompt")
    with gr.Row():
        max_tokens = gr.Number(COMPARE_MAX_TOKENS, precision=0, minimum=1, label="Max tokens per answer")
        button = gr.Button("Compare", variant="primary", elem_id="compare")
    status = gr.Markdown(elem_id="compare-status")
    with gr.Row():
        original_answer = gr.Textbox(label="Original answer", lines=8, interactive=False, elem_id="original-answer")
        abliterated_answer = gr.Textbox(
            label="Abliterated answer", lines=8, interactive=False, elem_id="abliterated-answer"
        )
    return dict(
        original=original,
        abliterated=abliterated,
        prompt=prompt,
        max_tokens=max_tokens,
        button=button,
        status=status,
        original_answer=original_answer,
        abliterated_answer=abliterated_answer,
    )


def _wire(form: dict, start: gr.Button, stop: gr.Button, results: RunView, compare: dict, output_root=None) -> None:
    runs: dict[str, threading.Event] = {}  # browser session -> its run's cancel flag
    by_name = {name: component for component, name in form.items()}

    def start_run(values: dict, request: gr.Request):
        cancel = runs[request.session_hash] = threading.Event()
        try:
            yield from run_abliteration_stream(
                **{form[c]: v for c, v in values.items()}, cancel=cancel, output_root=output_root
            )
        finally:
            if runs.get(request.session_hash) is cancel:
                del runs[request.session_hash]

    def stop_run(request: gr.Request) -> None:
        if request.session_hash in runs:
            runs[request.session_hash].set()

    def fill_compare(model: str, output_path: str):
        if not output_path:
            return gr.skip(), gr.skip()
        return model, str(Path(output_path).parent)

    run = start.click(start_run, inputs=set(form), outputs=list(results), concurrency_id="mlx", concurrency_limit=1)
    run.then(fill_compare, [by_name["model"], results.output_path], [compare["original"], compare["abliterated"]])
    stop.click(stop_run, None, None, queue=False)
    compare["button"].click(
        compare_answers,
        inputs=[
            compare["original"],
            compare["abliterated"],
            compare["prompt"],
            compare["max_tokens"],
            by_name["system_prompt"],
            by_name["cache_dir"],
        ],
        outputs=[compare["original_answer"], compare["abliterated_answer"], compare["status"]],
        concurrency_id="mlx",
        concurrency_limit=1,
    )


def launch(
    host: str = "127.0.0.1",
    port: int | None = None,
    share: bool = False,
    output_root: str | Path | None = None,
    **kwargs,
) -> gr.Blocks:
    """Serve the app on ``host:port`` (no public link unless ``share``); outputs only inside ``output_root``."""
    app = build_app(output_root)
    app.launch(server_name=host, server_port=port, share=share, css=CSS, **kwargs)
    return app
