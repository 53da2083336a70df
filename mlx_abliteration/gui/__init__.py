"""Gradio web UI: the same pipeline as ``mlx-abliterate run``, streamed to a browser."""

from mlx_abliteration.gui.app import build_app, launch
from mlx_abliteration.gui.stream import RunView, build_config, run_abliteration_stream

__all__ = ["RunView", "build_app", "build_config", "launch", "run_abliteration_stream"]
