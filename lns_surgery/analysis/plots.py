"""PNG plots of a depth report (matplotlib, Agg backend: no display needed).

- ``variance.png``: output variance of the residual stream after each block, models overlaid (log scale);
- ``removal.png``: loss increase when each block is bypassed, models overlaid;
- ``effective-scales.png``: each LNS model's effective scale per block and norm against its source;
- ``angular-<model>.png``: the angular distance between the inputs of blocks l and l+n, one heatmap
  per model, all on the same colour scale so that they can be compared.
"""

from __future__ import annotations

from pathlib import Path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def log_axis(axes) -> None:
    """A log-scale y axis labelled with plain numbers (20, 50, 100) rather than powers of ten."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    axes.set_yscale("log")
    axes.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    axes.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    axes.yaxis.set_minor_formatter(NullFormatter())


def _overlay(report: dict, key: str, ylabel: str, title: str, path: Path, log: bool = False) -> None:
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(7, 4.2))
    for model in report["models"]:
        points = [(layer["block"], layer[key]) for layer in model["layers"] if layer[key] is not None]
        if points:
            blocks, values = zip(*points)
            axes.plot(blocks, values, marker="o", markersize=3, label=f"{model['name']} ({model['status']})")
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    values = [layer[key] for m in report["models"] for layer in m["layers"] if layer[key] is not None]
    if log and values and min(values) > 0:
        axes.set_yscale("log")
        plain = FuncFormatter(lambda value, _: f"{value:g}")
        axes.yaxis.set_major_formatter(plain)
        if max(values) / min(values) < 100:  # few decades: label the minor ticks too
            axes.yaxis.set_minor_formatter(plain)
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    if key == "removal_loss_increase":
        axes.axhline(0.0, color="grey", linewidth=0.8)
    axes.set_xlabel("block l (1 = first)")
    axes.set_ylabel(ylabel)
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def _angular_heatmap(model: dict, vmax: float, path: Path) -> None:
    import numpy as np

    plt = _pyplot()
    rows = model["angular_distance"]
    count = len(rows)
    grid = np.full((count, count), np.nan)
    for index, row in enumerate(rows):
        for offset, value in enumerate(row):
            grid[index, offset] = np.nan if value is None else value
    figure, axes = plt.subplots(figsize=(6, 5))
    image = axes.imshow(grid, origin="lower", aspect="auto", cmap="viridis", vmin=0.0, vmax=vmax,
                        extent=(0.5, count + 0.5, 0.5, count + 0.5))
    axes.set_xlabel("n (blocks apart)")
    axes.set_ylabel("block l (1 = first)")
    tokens = "last token" if model["angular_distance_tokens"] == "last" else "all tokens"
    axes.set_title(f"Angular distance of inputs of blocks l and l+n\n{model['name']} ({model['status']}, {tokens})", fontsize=9)
    figure.colorbar(image, ax=axes, label="arccos(cos) / pi")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def _effective_scales(report: dict, path: Path) -> None:
    """Each LNS model's effective scale per block and norm, over the nominal 1/sqrt(l) and the line at 1
    (where training would have undone the scaling)."""
    from matplotlib.ticker import MaxNLocator

    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(7, 4.2))
    nominal = None
    for model in report["models"]:
        if not model.get("effective_scales_source"):
            continue
        layers = model["layers"]
        nominal = nominal or [(layer["block"], layer["lns_scale"]) for layer in layers]
        for norm in layers[0]["effective_scale"]:
            points = [(layer["block"], layer["effective_scale"][norm]) for layer in layers
                      if layer["effective_scale"][norm] is not None]
            if points:
                axes.plot(*zip(*points), marker="o", markersize=3, label=f"{model['name']}: {norm}")
    if nominal:
        axes.plot(*zip(*nominal), color="black", linestyle="--", linewidth=1, label="nominal scale (this model's alpha)")
    axes.axhline(1.0, color="grey", linewidth=0.8)
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_xlabel("block l (1 = first)")
    axes.set_ylabel("||c w|| / ||w_source||")
    axes.set_title("Effective LNS scale against the source checkpoint (1 = scaling undone)")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def write_plots(report: dict, folder: Path) -> list[Path]:
    """Write every plot of ``report`` into ``folder``; returns their paths."""
    folder = Path(folder)
    written = []
    path = folder / report["plots"]["variance"]
    _overlay(report, "output_variance", "output variance", "Residual-stream variance after each block", path, log=True)
    written.append(path)
    path = folder / report["plots"]["removal"]
    _overlay(report, "removal_loss_increase", "loss increase (nats/token)", "Layer removal: loss increase when a block is bypassed", path)
    written.append(path)
    if "effective_scales" in report["plots"]:
        path = folder / report["plots"]["effective_scales"]
        _effective_scales(report, path)
        written.append(path)
    values = [v for m in report["models"] for row in m["angular_distance"] for v in row if v is not None]
    vmax = max(values, default=1.0) or 1.0
    for model in report["models"]:
        path = folder / model["angular_distance_plot"]
        _angular_heatmap(model, vmax, path)
        written.append(path)
    return written
