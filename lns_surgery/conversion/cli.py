"""``lns-surgery convert | fold | inspect | archs``: thin wrappers over lns_surgery.conversion."""

from __future__ import annotations

import json

import click


def _norm_list(value: str | None) -> list[str] | None:
    return [name.strip() for name in value.split(",") if name.strip()] if value else None


def _quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()


@click.command("convert")
@click.argument("model")
@click.option("--out", required=True, type=click.Path(), help="Output folder (must not exist unless --overwrite).")
@click.option("--mode", type=click.Choice(["code", "fold"]), default="code", show_default=True,
              help="code: LNS classes shipped as custom code, weights unchanged; fold: stock classes, scales folded into norm weights.")
@click.option("--alpha", type=click.FloatRange(0.0, 1.0), default=1.0, show_default=True,
              help="Strength of the scaling: scale = 1 + alpha * (1/sqrt(l) - 1).")
@click.option("--overwrite", is_flag=True, help="Replace --out if lns-surgery wrote it (or it is empty).")
@click.option("--trust-remote-code", is_flag=True, help="Allow running the input checkpoint's own modeling code.")
@click.option("--layers", default=None, help="Dotted path of the decoder block list, for architectures the registry lacks.")
@click.option("--norms", default=None, help="Comma-separated names of the two pre-sublayer norms inside a block.")
@click.option("--force", is_flag=True,
              help="Scale the --norms given even where the model's data flow shows they are not pre-sublayer norms.")
@click.option("--revision", default=None, help="Hub revision when MODEL is a Hub id.")
@click.option("--link", type=click.Choice(["auto", "copy", "hardlink"]), default="auto", show_default=True,
              help="How weight files are copied: auto = copy-on-write clone if possible, else a copy.")
@click.option("--push-to-hub", "push_to_hub", metavar="REPO", default=None,
              help="Then validate and publish the output as Hub repository REPO (token: HF_TOKEN or the stored login).")
def convert_command(model, out, mode, alpha, overwrite, trust_remote_code, layers, norms, force, revision, link, push_to_hub):
    """Convert MODEL (a local folder or a Hub id) to LayerNorm Scaling."""
    _quiet_transformers()
    from lns_surgery.conversion.convert import convert

    path = convert(model, out, mode=mode, alpha=alpha, overwrite=overwrite, trust_remote_code=trust_remote_code,
                   layers=layers, norms=_norm_list(norms), revision=revision, link=link, force=force)
    if mode == "code":
        click.echo(f"wrote {path}: load it with AutoModelForCausalLM.from_pretrained('{path}', trust_remote_code=True)")
    else:
        click.echo(f"wrote {path}: a stock checkpoint with the scales folded into its norm weights")
    if push_to_hub:
        from lns_surgery.publish import push_to_hub as publish

        publish(path, push_to_hub)


@click.command("fold")
@click.argument("model")
@click.option("--out", required=True, type=click.Path(), help="Output folder.")
@click.option("--overwrite", is_flag=True, help="Replace --out if lns-surgery wrote it (or it is empty).")
@click.option("--link", type=click.Choice(["auto", "copy", "hardlink"]), default="auto", show_default=True)
def fold_command(model, out, overwrite, link):
    """Turn an LNS checkpoint into a stock checkpoint (for vLLM, llama.cpp, TGI, ...)."""
    _quiet_transformers()
    from lns_surgery.conversion.convert import fold

    click.echo(f"wrote {fold(model, out, overwrite=overwrite, link=link)}: stock classes, scales folded into the norm weights")


@click.command("inspect")
@click.argument("model")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--trust-remote-code", is_flag=True)
@click.option("--layers", default=None)
@click.option("--norms", default=None)
@click.option("--force", is_flag=True, help="Accept --norms the data flow does not show as pre-sublayer norms.")
@click.option("--revision", default=None)
def inspect_command(model, as_json, trust_remote_code, layers, norms, force, revision):
    """Show MODEL's layers, which norms get which scale, and its LNS status."""
    _quiet_transformers()
    from lns_surgery.conversion.convert import inspect_checkpoint

    report = inspect_checkpoint(model, trust_remote_code=trust_remote_code, layers=layers,
                                norms=_norm_list(norms), revision=revision, force=force)
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    status = {"stock": "stock (no LayerNorm Scaling)", "lns": f"LNS checkpoint, alpha={report['alpha']}",
              "lns-folded": f"LNS folded into the weights, alpha={report['alpha']}"}[report["status"]]
    click.echo(f"model:        {report['source']}")
    click.echo(f"model_type:   {report['model_type']} (base {report['base_model_type']}, layout from {report['architecture_from']})")
    click.echo(f"status:       {status}")
    click.echo(f"layers:       {report['layers']} ({report['num_layers']} blocks)")
    click.echo(f"scaled norms: {', '.join(report['norms'])} ({report['norm_kind']})")
    click.echo(f"foldable:     {'yes (' + report['fold_rule'] + ')' if report['fold_rule'] else 'no: code mode only'}")
    if report.get("note"):
        click.echo(f"note:         {report['note']}")
    click.echo("block  scale")
    for index, scale in enumerate(report["scales"]):
        click.echo(f"{index + 1:>5}  {scale:.6f}")


@click.command("archs")
@click.option("--markdown", is_flag=True, help="Print the table in docs/architectures.md.")
def archs_command(markdown):
    """List the architectures in the registry."""
    from lns_surgery.conversion.registry import architecture_table

    click.echo(architecture_table() if markdown else architecture_table(plain=True))
