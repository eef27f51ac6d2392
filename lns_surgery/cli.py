"""The `lns-surgery` command line: a thin layer over the Python API.

Each command lives beside the stage it drives (``lns_surgery/<stage>/cli.py``) and is imported only
when it runs, so ``lns-surgery --help`` does not pay for importing torch and transformers.
"""

from __future__ import annotations

import importlib
import logging
import signal
import sys

import click

from lns_surgery.core.errors import LNSError, first_line

# command name -> (module, attribute, one-line help shown by `lns-surgery --help`)
COMMANDS = {
    "convert": ("lns_surgery.conversion.cli", "convert_command", "Convert a pretrained checkpoint to LayerNorm Scaling."),
    "fold": ("lns_surgery.conversion.cli", "fold_command", "Fold an LNS checkpoint's scales into stock weights."),
    "inspect": ("lns_surgery.conversion.cli", "inspect_command", "Show a checkpoint's layers, norms, scales and LNS status."),
    "archs": ("lns_surgery.conversion.cli", "archs_command", "List the supported architectures."),
    "init": ("lns_surgery.training.cli", "init_command", "Create a from-scratch (LNS or Pre-LN) model."),
    "pretrain": ("lns_surgery.training.cli", "pretrain_command", "Continued pre-training (healing) from a YAML recipe."),
    "sft": ("lns_surgery.training.cli", "sft_command", "Supervised fine-tuning (LoRA/full) from a YAML recipe."),
    "analyze": ("lns_surgery.analysis.cli", "analyze_command", "Measure depth utilisation of one or more models."),
    "push": ("lns_surgery.publish.cli", "push_command", "Validate and publish a checkpoint to the Hugging Face Hub."),
    "demo": ("lns_surgery.demo.cli", "demo_command", "Run the whole pipeline offline on the built-in model."),
}


class Terminated(BaseException):
    """SIGTERM, raised where the process is, so that the cleanup of temporary output folders runs."""


def _raise_terminated(signum, frame):
    raise Terminated


class LazyGroup(click.Group):
    """A click group whose subcommands are imported on first use."""

    def list_commands(self, ctx):
        return list(COMMANDS)

    def get_command(self, ctx, name):
        if name not in COMMANDS:
            return None
        module_name, attribute, _ = COMMANDS[name]
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:  # a stage that this install does not have
            if not exc.name or not exc.name.startswith("lns_surgery"):
                raise
            return None
        return getattr(module, attribute, None)

    def format_commands(self, ctx, formatter):
        rows = [(name, help_text) for name, (_, _, help_text) in COMMANDS.items()]
        with formatter.section("Commands"):
            formatter.write_dl(rows)

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        """click's own usage errors (an unknown option, a bad value) as one line, exit 2, like every
        other error a user can cause; click prints three lines by itself."""
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.UsageError as exc:
            where = f" (see '{exc.ctx.command_path} --help')" if exc.ctx is not None else ""
            click.echo(f"error: {exc.format_message()}{where}", err=True)
            sys.exit(2)
        except click.ClickException as exc:
            click.echo(f"error: {exc.format_message()}", err=True)
            sys.exit(exc.exit_code)
        except click.Abort:
            click.echo("aborted", err=True)
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)

    def invoke(self, ctx):
        try:  # only the main thread may set handlers (a caller may run the CLI in another)
            previous = signal.signal(signal.SIGTERM, _raise_terminated)
        except ValueError:
            previous = None
        try:
            return super().invoke(ctx)
        except LNSError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(exc.exit_code)
        except (click.ClickException, click.Abort, click.exceptions.Exit):
            raise
        except Exception as exc:  # a bug, or a library failing in a way nothing here anticipated
            if ctx.params.get("debug"):
                raise
            click.echo(f"error: internal error ({type(exc).__name__}: {first_line(exc)}); run again with "
                       "`lns-surgery --debug ...` (or LNS_SURGERY_DEBUG=1) for the traceback", err=True)
            sys.exit(1)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)
        except Terminated:
            click.echo("terminated", err=True)
            sys.exit(128 + signal.SIGTERM)
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)


def _show_warnings() -> None:
    """The package's own warnings (e.g. what detection found) reach the user as 'warning: ...' lines."""
    logger = logging.getLogger("lns_surgery")
    logger.handlers[:] = [logging.StreamHandler(sys.stderr)]
    logger.handlers[0].setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
    logger.setLevel(logging.WARNING)
    logger.propagate = False


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="lns-surgery")
@click.option("--debug", is_flag=True, envvar="LNS_SURGERY_DEBUG",
              help="Show the full traceback of an internal error instead of one line.")
def main(debug):
    """LayerNorm Scaling surgery for pretrained Hugging Face decoders."""
    _show_warnings()
