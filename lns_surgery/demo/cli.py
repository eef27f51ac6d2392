"""``lns-surgery demo``: a thin wrapper over ``lns_surgery.demo.pipeline.run_demo``."""

from __future__ import annotations

import click

from lns_surgery.demo.pipeline import DEFAULT_BASE, DEFAULT_OUT


@click.command("demo")
@click.option("--out", default=DEFAULT_OUT, show_default=True, type=click.Path(),
              help="Folder for every artefact and the summary (must not exist unless --overwrite).")
@click.option("--overwrite", is_flag=True, help="Replace --out if lns-surgery wrote it (or it is empty).")
@click.option("--quick", is_flag=True, help="Shorter runs and smaller evaluation sets (CI, a first look).")
@click.option("--steps-scale", type=click.FloatRange(min=0.0, min_open=True), default=1.0, show_default=True,
              help="Multiply the healing and fine-tuning steps by this factor.")
@click.option("--base", default=DEFAULT_BASE, show_default=True,
              help="Pre-LN model to start from: the shipped one, or a folder written by scripts/train_demo_base.py.")
@click.option("--threads", type=click.IntRange(min=1), default=1, show_default=True,
              help="CPU threads for torch. The demo's model is tiny: more threads only help on an idle machine.")
def demo_command(out, overwrite, quick, steps_scale, base, threads):
    """Run the whole job offline on CPU on the shipped pretrained model, in a few minutes.

    Measures the base model, converts it to LayerNorm Scaling, heals it with a ramped continued
    pre-training, fine-tunes it with LoRA on a small instruction task, analyses every stage's depth
    utilisation and reloads the export in a fresh process. Writes summary.md and summary.json (every
    figure, every artefact's place) into --out.
    """
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything the demo needs ships with the package
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

    from lns_surgery.demo.pipeline import run_demo

    run_demo(out, steps_scale=steps_scale, quick=quick, overwrite=overwrite, base=base, threads=threads,
             echo=click.echo)
