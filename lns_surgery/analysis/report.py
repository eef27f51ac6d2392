"""The report folder: ``report.json``, ``summary.md`` and the plots.

``report.json`` (schema_version 1)::

    {
      "schema_version": 1,
      "tool_version": "0.1.0",
      "created": "2026-01-01T12:00:00+00:00",      # UTC
      "settings": {"source", "max_tokens", "seq_len", "batch_size", "last_token", "text_field", "split",
                   "tasks", "tasks_include", "tasks_limit"},  # as given (seq_len null = each model's default;
                                                     # tasks_include: the task folders, absolute)
      "plots": {"variance": "variance.png", "removal": "removal.png",   # models overlaid
                "effective_scales": "effective-scales.png"},           # only when a model has them
      "models": [                                    # one entry per model, in the order given
        {
          "name": str,                               # as given on the command line
          "status": "stock" | "lns" | "lns-folded",
          "lns_alpha": float | null,                 # LNS strength (null for stock)
          "model_type": str, "num_layers": int (L), "num_parameters": int, "dtype": str,
          "data": str, "windows": int, "seq_len": int,
          "tokens": int,                             # tokens run through the model (windows x seq_len)
          "perplexity": float,                       # exp(mean next-token NLL) over the windows
          "loss": float,                             # mean next-token NLL, nats
          "embedding_variance": float,               # variance of the block-1 input (the embeddings)
          "angular_distance_tokens": "all" | "last", # tokens the angular distance is averaged over
          "angular_distance": [[float]],             # [l][n-1], l = 0..L-1, n = 1..L-l: angular distance
                                                     # arccos(cos)/pi between the inputs of blocks l and
                                                     # l+n (0-based; "input of block L" = last block's output)
          "angular_distance_plot": "angular-<name>.png",  # its heatmap
          "effective_scales_source": str | null,     # the checkpoint the effective scales compare with
          "tasks": {task: {metric: float}} | null,   # lm-eval on the whole model (with --tasks), keyed by
                                                     # each task's own name (a YAML file's `task:`); groups
                                                     # appear when lm-eval aggregates them
          "layers": [                                # one per block
            {
              "index": int,                          # 0-based, as in model.layers.<index>
              "block": int,                          # index + 1: the l of the 1/sqrt(l) rule
              "lns_scale": float,                    # scale of the block's pre-norms (1.0 for stock)
              "output_variance": float,              # variance of the residual stream after the block
                                                     # (over the hidden dimension, mean over tokens)
              "residual_norm": float,                # mean L2 norm of the residual stream after the block
              "attention_update_norm": float | null, # mean L2 norm of what attention adds to the stream
              "mlp_update_norm": float | null,       # ... and the MLP (null: parallel residual / unknown norms)
              "angular_distance_next": float,        # = angular_distance[index][0]: input vs output of the block
              "removal_perplexity": float | null,    # perplexity with this block bypassed
              "removal_loss_increase": float | null, # its loss minus the model's loss (nats/token)
              "removal_tasks": {task: {metric: float}}, # only with --tasks: lm-eval with the block bypassed
              "effective_scale": {norm: float}       # LNS models whose source is known: ||c*w|| / ||w_source||
                                                     # per scaled norm (lns_scale after conversion, 1 where
                                                     # training has undone the scaling)
            }
          ]
        }
      ]
    }

A number that is not finite (a perplexity that overflowed) is written as null.
"""

from __future__ import annotations

import json
import re
from datetime import datetime, timezone
from pathlib import Path

from lns_surgery.core.markdown import table
from lns_surgery.core.reports import json_safe

SCHEMA_VERSION = 1


def slugs(names: list[str]) -> list[str]:
    """File-name-safe, distinct short names for the models (``Qwen/Qwen2.5-0.5B`` -> ``Qwen-Qwen2.5-0.5B``)."""
    result = []
    for name in names:
        base = re.sub(r"[^A-Za-z0-9._-]+", "-", str(name).rstrip("/\\")).strip("-.") or "model"
        base = base[-80:]
        slug, suffix = base, 2
        while slug in result:
            slug, suffix = f"{base}-{suffix}", suffix + 1
        result.append(slug)
    return result


def _tool_version() -> str:
    from lns_surgery import __version__

    return __version__


def build_report(entries: list[dict], settings: dict) -> dict:
    names = [entry["name"] for entry in entries]
    entries = [{**entry, "angular_distance_plot": f"angular-{slug}.png"} for entry, slug in zip(entries, slugs(names))]
    plots = {"variance": "variance.png", "removal": "removal.png"}
    if any(entry.get("effective_scales_source") for entry in entries):
        plots["effective_scales"] = "effective-scales.png"
    return json_safe({
        "schema_version": SCHEMA_VERSION,
        "tool_version": _tool_version(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "settings": settings,
        "plots": plots,
        "models": entries,
    })


def summary_markdown(report: dict) -> str:
    """The report's tables as Markdown."""
    models = report["models"]
    settings = report["settings"]
    lines = ["# Depth diagnostics", ""]
    lines.append(
        f"Data: `{settings['source']}`. Angular distance averaged over "
        f"{'the last token of each window' if settings['last_token'] else 'all tokens'}. "
        "Removal: perplexity with one block bypassed (no fine-tuning); Δloss = its loss minus the model's, in nats/token."
    )
    lines += ["", "## Models", ""]
    rows = [[m["name"], m["status"] + (f" (alpha {m['lns_alpha']:g})" if m["lns_alpha"] is not None else ""),
             m["num_layers"], m["tokens"], m["perplexity"],
             max((layer["removal_loss_increase"] for layer in m["layers"] if layer["removal_loss_increase"] is not None), default=None),
             min((layer["removal_loss_increase"] for layer in m["layers"] if layer["removal_loss_increase"] is not None), default=None)]
            for m in models]
    lines += table(["model", "status", "layers", "tokens", "perplexity", "largest Δloss", "smallest Δloss"], rows)

    for model in models:
        lines += ["", f"## {model['name']}", ""]
        plot = model.get("angular_distance_plot")
        rows = [[layer["block"], layer["lns_scale"], layer["output_variance"], layer["attention_update_norm"],
                 layer["mlp_update_norm"], layer["angular_distance_next"], layer["removal_perplexity"],
                 layer["removal_loss_increase"]] for layer in model["layers"]]
        lines += table(["block", "LNS scale", "output variance", "attention update", "MLP update",
                         "angular dist. to next", "removal perplexity", "Δloss"], rows)
        if model.get("effective_scales_source"):
            norms = list(model["layers"][0]["effective_scale"])
            lines += ["", f"Effective LNS scale ||c*w|| / ||w_source|| against `{model['effective_scales_source']}` "
                          "(the nominal scale right after conversion; 1 means training undid the scaling):", ""]
            rows = [[layer["block"], layer["lns_scale"]] + [layer["effective_scale"][norm] for norm in norms]
                    for layer in model["layers"]]
            lines += table(["block", "nominal"] + norms, rows)
        if model.get("tasks"):
            lines += ["", "lm-eval, whole model and with each block bypassed:", ""]
            metrics = [(task, metric) for task, values in model["tasks"].items() for metric in values if "stderr" not in metric]
            header = ["block"] + [f"{task} {metric}" for task, metric in metrics]
            rows = [["none"] + [model["tasks"][task][metric] for task, metric in metrics]]
            rows += [[str(layer["block"])] + [layer["removal_tasks"].get(task, {}).get(metric) for task, metric in metrics]
                     for layer in model["layers"]]
            lines += table(header, rows)
        if plot:
            lines += ["", f"![angular distance]({plot})"]

    if len(models) > 1:
        lines += ["", "## Side by side: Δloss when a block is removed", ""]
        depth = max(m["num_layers"] for m in models)
        rows = []
        for index in range(depth):
            rows.append([index + 1] + [m["layers"][index]["removal_loss_increase"] if index < m["num_layers"] else None for m in models])
        lines += table(["block"] + [m["name"] for m in models], rows)
    lines += ["", f"![output variance]({report['plots']['variance']})", "",
              f"![removal]({report['plots']['removal']})", ""]
    if "effective_scales" in report["plots"]:
        lines += [f"![effective LNS scales]({report['plots']['effective_scales']})", ""]
    return "\n".join(lines)


def write_outputs(report: dict, folder: Path) -> None:
    """report.json, summary.md and every plot into ``folder``."""
    from lns_surgery.analysis import plots

    folder = Path(folder)
    with open(folder / "report.json", "w", encoding="utf-8") as handle:
        json.dump(report, handle, indent=2, allow_nan=False)
        handle.write("\n")
    (folder / "summary.md").write_text(summary_markdown(report), encoding="utf-8")
    plots.write_plots(report, folder)
