"""``lns-surgery analyze``: a thin wrapper over ``lns_surgery.analysis.analyze``."""

from __future__ import annotations

import click


@click.command("analyze")
@click.argument("models", nargs=-1, required=True)
@click.option("--data", required=True,
              help="Evaluation text: a .txt, .jsonl or .json file, or a Hub dataset NAME[:CONFIG].")
@click.option("--out", required=True, type=click.Path(), help="Report folder (must not exist unless --overwrite).")
@click.option("--max-tokens", type=click.IntRange(min=2), default=100_000, show_default=True,
              help="Tokens to evaluate per model (rounded down to whole windows).")
@click.option("--seq-len", type=click.IntRange(min=2), default=None,
              help="Window length in tokens  [default: 512, or less if the model supports less].")
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True, help="Windows per forward pass.")
@click.option("--last-token", is_flag=True,
              help="Average the angular distance over the last token of each window (the paper's code) instead of all tokens.")
@click.option("--tasks", default=None,
              help="Comma-separated lm-eval tasks for the removal sweep: names (arc_easy, a group, a pattern arc_*), "
                   "task YAML files, or names of tasks in --tasks-include folders; needs lns-surgery[eval].")
@click.option("--tasks-include", "tasks_include", multiple=True, type=click.Path(),
              help="A folder of lm-eval task YAML files whose tasks --tasks can name (lm-eval's include_path); repeatable.")
@click.option("--tasks-limit", type=click.IntRange(min=1), default=None, help="Examples per lm-eval task (default: all).")
@click.option("--text-field", default="text", show_default=True, help="Field of a .jsonl/.json record or dataset row that holds the text.")
@click.option("--split", default="validation", show_default=True, help="Split of a Hub dataset.")
@click.option("--tokenizer", default=None, help="Tokenizer for every model (default: each model's own).")
@click.option("--device", default="auto", show_default=True, help="auto (cuda if available), cpu, cuda, cuda:1, ...")
@click.option("--dtype", type=click.Choice(["auto", "float32", "bfloat16", "float16"]), default="auto", show_default=True,
              help="auto: float32 on CPU, the checkpoint's dtype on an accelerator.")
@click.option("--source", default=None, type=click.Path(),
              help="Checkpoint (folder) to measure each LNS model's effective scales against: ||c*w|| / ||w_source|| per "
                   "block and norm, 1 where training undid the scaling  [default: the source an LNS model records].")
@click.option("--trust-remote-code", is_flag=True, help="Allow running a checkpoint's own modeling code.")
@click.option("--overwrite", is_flag=True, help="Replace --out if lns-surgery wrote it (or it is empty).")
def analyze_command(models, data, out, max_tokens, seq_len, batch_size, last_token, tasks, tasks_include, tasks_limit, text_field,
                    split, tokenizer, device, dtype, source, trust_remote_code, overwrite):
    """Measure how much each block of MODELS (folders, Hub ids or builtin: names) contributes.

    Writes report.json, summary.md and plots (variance per block, angular-distance heatmaps, layer-removal
    loss increase) into --out. Give a stock model and its LNS conversion to compare them side by side.
    """
    from transformers.utils import logging as hf_logging

    from lns_surgery.analysis.run import analyze

    hf_logging.set_verbosity_error()
    report = analyze(list(models), data, out, max_tokens=max_tokens, seq_len=seq_len, batch_size=batch_size,
                     last_token=last_token, tasks=tasks, tasks_limit=tasks_limit, tasks_include=list(tasks_include),
                     overwrite=overwrite,
                     tokenizer=tokenizer, text_field=text_field, split=split, device=device, dtype=dtype,
                     trust_remote_code=trust_remote_code, source=source)
    for model in report["models"]:
        worst = max((layer for layer in model["layers"] if layer["removal_loss_increase"] is not None),
                    key=lambda layer: layer["removal_loss_increase"], default=None)
        least = min((layer for layer in model["layers"] if layer["removal_loss_increase"] is not None),
                    key=lambda layer: layer["removal_loss_increase"], default=None)
        line = f"{model['name']} ({model['status']}, {model['num_layers']} blocks): perplexity {model['perplexity']:.4g}"
        if worst is not None:
            line += (f"; removing block {worst['block']} costs most (+{worst['removal_loss_increase']:.3g} nats), "
                     f"block {least['block']} least ({least['removal_loss_increase']:+.3g})")
        click.echo(line)
    click.echo(f"wrote {out}: report.json, summary.md and plots")
