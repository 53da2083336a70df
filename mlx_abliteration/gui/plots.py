"""The per-layer plot: refusal-direction norm and separation, chosen layer marked."""

from __future__ import annotations

from matplotlib.figure import Figure  # noqa: TID253  (the GUI: imported only to run it)
from matplotlib.ticker import MaxNLocator  # noqa: TID253


def layer_figure(stats: list[dict], chosen: int | None) -> Figure:
    """Norm ‖d‖ (left axis) and separation (right axis) per probed layer.

    A plain ``Figure`` (not pyplot) so nothing is kept in a global registry
    between runs.
    """
    figure = Figure(figsize=(7.5, 3.8), layout="constrained")
    norm_axis = figure.add_subplot()
    layers = [s["layer"] for s in stats]
    lines = norm_axis.plot(layers, [s["norm"] for s in stats], "o-", color="tab:blue", label="direction norm ‖d‖")
    norm_axis.set_xlabel("layer")
    norm_axis.set_ylabel("norm ‖d‖", color="tab:blue")
    separation_axis = norm_axis.twinx()
    lines += separation_axis.plot(
        layers, [s["separation"] for s in stats], "s--", color="tab:orange", label="separation (norm / spread)"
    )
    separation_axis.set_ylabel("separation", color="tab:orange")
    if chosen is not None:
        lines.append(norm_axis.axvline(chosen, color="tab:red", linewidth=2, alpha=0.7, label=f"chosen layer {chosen}"))
    figure.suptitle("Refusal direction per layer", fontsize="medium")
    figure.legend(handles=lines, loc="outside lower center", ncols=len(lines), fontsize="small", frameon=False)
    norm_axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    return figure
