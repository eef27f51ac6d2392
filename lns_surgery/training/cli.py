"""``lns-surgery init | pretrain | sft``: thin wrappers over lns_surgery.training.

``pretrain`` and ``sft`` take a YAML recipe and pass every other ``--key value`` flag to TRL's
parser, so any recipe key (``--learning_rate 1e-4``, ``--output_dir out/x``) overrides the file.
"""

from __future__ import annotations

import click

_PASS_THROUGH = {"ignore_unknown_options": True, "allow_extra_args": True, "help_option_names": ["-h", "--help"]}


def _quiet() -> None:
    import warnings

    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_warning()
    warnings.filterwarnings("ignore", message=".*gradient_checkpointing.*deprecated", category=FutureWarning)


def _run(command: str, recipe, resume: bool, overwrite: bool, extra: list[str], push_to_hub: str | None = None) -> None:
    _quiet()
    from lns_surgery.training.recipe import parse_recipe
    from lns_surgery.training.run import train

    argv = list(extra)
    if resume:
        argv += ["--resume", "true"]
    if overwrite:
        argv += ["--overwrite", "true"]
    parsed = parse_recipe(argv, command=command, recipe=recipe)
    result = train(parsed)
    evaluation = result.metrics.get("eval") or {}
    summary = f"wrote {result.output_dir} ({result.metrics['train']['global_step']} steps"
    if "eval_loss" in evaluation:
        summary += f", eval loss {evaluation['eval_loss']:.4f}, perplexity {evaluation['eval_perplexity']:.2f}"
    main_process = result.trainer is None or result.trainer.is_world_process_zero()
    if main_process:
        click.echo(summary + ")")
    if push_to_hub and main_process:
        # Our own push, not the Trainer's: it validates the folder and writes the model card first.
        from lns_surgery.publish import push_to_hub as publish

        publish(result.output_dir, push_to_hub)
    if result.trainer is not None:
        # finish the trackers and the process group: what Trainer.end() does (transformers 5.17 has no end())
        result.trainer.accelerator.end_training()


_RECIPE_HELP = "YAML recipe; any recipe key can also be given as --key value and overrides the file."


def _training_command(name: str):
    """The click command shared by ``pretrain`` and ``sft``: a recipe plus pass-through --key value flags."""

    def decorate(function):
        @click.command(name, context_settings=_PASS_THROUGH, help=function.__doc__)
        @click.option("--recipe", type=click.Path(dir_okay=False), default=None, help=_RECIPE_HELP)
        @click.option("--resume", is_flag=True, help="Continue the interrupted run of this output_dir from its last checkpoint.")
        @click.option("--overwrite", is_flag=True, help="Replace output_dir and any leftover checkpoints.")
        @click.option("--push-to-hub", "push_to_hub", metavar="REPO", default=None,
                      help="At the end, validate and publish output_dir as Hub repository REPO.")
        @click.pass_context
        def command(ctx, recipe, resume, overwrite, push_to_hub):
            _run(name, recipe, resume, overwrite, ctx.args, push_to_hub)

        return command

    return decorate


@_training_command("pretrain")
def pretrain_command():
    """Continued pre-training (healing) of a converted model, or pre-training from scratch.

    Packs plain text, trains all weights by default; `lns_ramp_steps: N` starts from the original
    function and reaches full LayerNorm Scaling after N steps.
    """


@_training_command("sft")
def sft_command():
    """Supervised fine-tuning (LoRA by default, or full) on alpaca, chat or prompt/completion data.

    Writes the adapter and a merged standalone LNS checkpoint; see recipes/README.md.
    """


@click.command("init", context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("preset", required=False)
@click.option("--out", required=True, type=click.Path(), help="Output folder.")
@click.option("--no-lns", is_flag=True, help="The Pre-LN baseline (no LayerNorm Scaling), for comparisons.")
@click.option("--tokenizer", default=None, help="Tokenizer folder or Hub id; sets the vocabulary size and special ids.")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None,
              help="LlamaConfig fields as JSON; they override the preset's (or replace it when no preset is given).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--overwrite", is_flag=True, help="Replace --out if lns-surgery wrote it (or it is empty).")
def init_command(preset, out, no_lns, tokenizer, config_path, seed, overwrite):
    """Create a from-scratch Llama model: PRESET is llama-130m, llama-250m, llama-350m or llama-1b
    (the paper's shapes), with plain normal init (std 0.02)."""
    _quiet()
    from lns_surgery.training.models import init_model

    path = init_model(preset, out, lns=not no_lns, tokenizer=tokenizer, config=config_path, overwrite=overwrite,
                      seed=seed)
    kind = "Pre-LN baseline" if no_lns else "LNS"
    click.echo(f"wrote {path}: a from-scratch {kind} model"
               + ("" if no_lns else f"; load it with AutoModelForCausalLM.from_pretrained('{path}', trust_remote_code=True)"))
