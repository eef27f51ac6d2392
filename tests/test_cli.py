"""The command line: every command answers --help, and --help stays light."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import invoke_cli

from lns_surgery.cli import COMMANDS


@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_command_has_help(command):
    result = invoke_cli(command, "--help")
    assert result.returncode == 0, result.stderr
    assert "Usage:" in result.stdout and command in result.stdout


def test_top_level_help_lists_every_command_without_importing_torch():
    code = (
        "import sys\n"
        "from click.testing import CliRunner\n"
        "from lns_surgery.cli import main\n"
        "result = CliRunner().invoke(main, ['--help'])\n"
        "print(result.exit_code, 'torch' in sys.modules, 'transformers' in sys.modules)\n"
        "print(result.output)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    first, rest = result.stdout.split("\n", 1)
    assert first == "0 False False", "`lns-surgery --help` must not import torch or transformers"
    for command in COMMANDS:
        assert command in rest


def test_unknown_command_is_one_line_error():
    result = invoke_cli("no-such-command")
    assert result.returncode != 0 and "No such command" in result.stderr
