"""``lns-surgery push`` and the ``--push-to-hub`` hook of the other commands: thin layers over ``push``."""

from __future__ import annotations

from pathlib import Path

import click

# The limits are shown in --help; importing them must stay cheap (both modules import only the standard
# library and this package at the top).
from lns_surgery.publish.upload import HUB_TIMEOUT_S
from lns_surgery.publish.validate import LOAD_CHECK_TIMEOUT_S


def _quiet_libraries() -> None:
    from huggingface_hub.utils import logging as hub_logging
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hub_logging.set_verbosity_error()


def _progress(line: str) -> None:
    click.echo(line, err=True)


def echo_result(result, show_card: bool = False, echo=click.echo) -> None:
    """Print what ``push`` did (or, for a dry run, would do): validation, card, files, and where they went."""
    from lns_surgery.publish.files import human_size

    echo(f"validation: {result.validation.summary()}")
    card = result.card
    origin = "; ".join(f"{key} from {where}" for key, where in card.inherited.items())
    verb = {"created": "created", "refreshed": "refreshed (notes kept)", "replaced": "replaced (it was not written by lns-surgery)"}
    echo(f"README.md: {'would be ' if result.dry_run else ''}{verb[card.action]}" + (f"; {origin}" if origin else ""))
    for note in card.notes:
        echo(f"note: {note}")
    target = f"{result.repo_id} ({'a pull request against main' if result.create_pr else result.revision})"
    echo(f"files{' to upload' if result.dry_run else ' uploaded'} to {target}: {len(result.files.files)} files, {human_size(result.files.total_bytes)}")
    width = max((len(human_size(item.size)) for item in result.files.files), default=0)
    for item in result.files.files:
        echo(f"  {human_size(item.size):>{width}}  {item.path}")
    if result.files.excluded:
        echo(f"left out: {len(result.files.excluded)}")
        for path, reason in result.files.excluded:
            echo(f"  {path}  ({reason})")
    if show_card:
        echo("----- README.md -----")
        echo(result.card.text.rstrip("\n"))
        echo("----- end of README.md -----")
    if result.dry_run:
        echo("dry run: nothing was uploaded and nothing was written")
        return
    echo(f"commit: {result.commit_url}")
    if result.pr_url:
        echo(f"pull request: {result.pr_url}")


def push_to_hub(folder, repo_id: str, *, private: bool = False, token: str | None = None, check_load: bool = False,
                echo=click.echo):
    """What ``--push-to-hub REPO`` of convert / pretrain / sft calls once their output folder is complete."""
    from lns_surgery.publish.upload import push

    _quiet_libraries()
    result = push(folder, repo_id, private=private, token=token, check_load=check_load, progress=_progress)
    echo_result(result, echo=echo)
    return result


@click.command("push")
@click.argument("folder", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--repo-id", required=True, help="The Hub repository: OWNER/NAME (created if it does not exist).")
@click.option("--private", is_flag=True, help="Create the repository as private (an existing one keeps its visibility).")
@click.option("--branch", default=None, help="Upload to this branch (created from main if needed) instead of main.")
@click.option("--create-pr", is_flag=True, help="Open a pull request against main instead of committing to it.")
@click.option("--message", "-m", default=None, help="Commit message.")
@click.option("--token", default=None, help="Hub token with write access (default: HF_TOKEN, then the stored login). Never printed.")
@click.option("--dry-run", is_flag=True,
              help="Validate and show the files and the model card; no network, nothing written, and none of the "
                   "folder's code run unless --check-load (or --check-load-unsandboxed) is given too.")
@click.option("--check-load", is_flag=True,
              help="Also load the checkpoint in a fresh process with trust_remote_code=True, as a user of the published "
                   "model would. This EXECUTES the folder's Python code (modeling, configuration, tokenizer), in a "
                   "sandbox (Linux namespaces through util-linux `unshare`: no network, none of your files or "
                   "processes, no credentials, the checkpoint read-only), stopped with everything it started after "
                   f"--check-load-timeout seconds ({LOAD_CHECK_TIMEOUT_S} by default). Refused where no sandbox can be made.")
@click.option("--check-load-unsandboxed", is_flag=True,
              help="Like --check-load, but where no sandbox can be made, run the folder's code as you: it can then "
                   "read your files and credentials, use the network, and leave processes behind.")
@click.option("--check-load-timeout", type=click.IntRange(min=1), default=LOAD_CHECK_TIMEOUT_S, show_default=True,
              help="Seconds the --check-load process may take.")
@click.option("--hub-timeout", type=click.FloatRange(min=0.1), default=HUB_TIMEOUT_S, show_default=True,
              help="Seconds of silence from the Hub (connecting, or between bytes) before the push gives up.")
def push_command(folder, repo_id, private, branch, create_pr, message, token, dry_run, check_load,
                 check_load_unsandboxed, check_load_timeout, hub_timeout):
    """Validate the checkpoint in FOLDER, write its model card, and upload it to the Hugging Face Hub.

    The folder is checked without running any of its code: config, custom-code files, weights, tokenizer.
    --check-load also loads it in a fresh, sandboxed process, which runs its code. Any problem stops the push
    before anything is uploaded, and the folder's README.md becomes the model card only once the upload
    has succeeded. Optimizer, scheduler and RNG states, checkpoint-* folders and logs stay home.
    """
    _quiet_libraries()
    from lns_surgery.publish.upload import push

    result = push(folder, repo_id, private=private, branch=branch, create_pr=create_pr, message=message,
                  token=token, dry_run=dry_run, check_load=check_load or check_load_unsandboxed,
                  load_timeout=check_load_timeout, progress=_progress, timeout=hub_timeout,
                  allow_unsandboxed=check_load_unsandboxed)
    echo_result(result, show_card=dry_run)
