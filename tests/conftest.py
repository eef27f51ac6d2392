"""Shared test setup: offline Hugging Face libraries, the ../shared material, fresh-process helpers."""

from __future__ import annotations

import hashlib
import os
import stat
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

# Before anything imports huggingface_hub or transformers: nothing may reach the network.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tests run two at a time (pytest -n 2) on two cores: one thread each is several times faster than
# both fighting over two threads each. Child processes inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
# Remote code loaded by tests is copied into a throw-away module cache, not the user's.
os.environ.setdefault("HF_MODULES_CACHE", tempfile.mkdtemp(prefix="lns-test-hf-modules-"))

import pytest  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("LNS_SHARED_DIR", REPO_ROOT.parent / "shared"))
STORIES = "models/stories260K"

sys.path.insert(0, str(Path(__file__).resolve().parent))  # tests/ helpers (tiny_models)


def shared_path(relative: str) -> Path:
    """A file or folder in ../shared; skips the test when it is absent, fails instead when
    LNS_REQUIRE_SHARED=1 (as in CI), so that no test silently stops running there."""
    path = SHARED / relative
    if not path.exists():
        message = f"needs ../shared/{relative} (the shared models and data of this setup); not found at {path}"
        if os.environ.get("LNS_REQUIRE_SHARED") == "1":
            pytest.fail(message + " and LNS_REQUIRE_SHARED=1")
        pytest.skip(message)
    return path


@pytest.fixture
def stories_path() -> Path:
    return shared_path(STORIES)


def run_fresh_python(code: str, cwd: Path | None = None, block_lns_surgery: bool = True, timeout: int = 300):
    """Run ``code`` in a new interpreter; by default ``import lns_surgery`` fails there, as it would on
    a machine that only has transformers. Returns the completed process (stdout, stderr, returncode)."""
    prelude = "import sys\nsys.modules['lns_surgery'] = None\n" if block_lns_surgery else ""
    env = dict(os.environ)
    if block_lns_surgery:  # an editable install puts the repo on sys.path through a .pth hook: cwd elsewhere
        env.pop("PYTHONPATH", None)
    return subprocess.run(
        [sys.executable, "-c", prelude + textwrap.dedent(code)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=timeout,
    )


def run_cli(*args: str, cwd: Path | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run ``lns-surgery ARGS`` as a user would, in a child process."""
    return subprocess.run(
        [sys.executable, "-m", "lns_surgery", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=timeout,
    )


def invoke_cli(*args: str):
    """Run ``lns-surgery ARGS`` inside this process (fast; for checks of errors and output)."""
    from click.testing import CliRunner

    from lns_surgery.cli import main

    result = CliRunner().invoke(main, list(args), catch_exceptions=False)
    return subprocess.CompletedProcess(args, result.exit_code, result.stdout, result.stderr)


def pytest_terminal_summary(terminalreporter):
    """The zoo's outcome counts, whenever the zoo test ran."""
    reports = [r for key in ("passed", "failed") for r in terminalreporter.stats.get(key, [])]
    if any("test_zoo.py::test_zoo_type" in getattr(r, "nodeid", "") for r in reports):
        from test_zoo import zoo_counts

        counts = zoo_counts()
        terminalreporter.write_line(
            f"zoo: {counts['exact']} converted exactly, {counts['refused']} refused, "
            f"{counts['not buildable']} not buildable tiny, of {counts['types']} model types"
        )


def tree_state(root: Path) -> dict[str, tuple]:
    """Every entry below ``root``: files by content hash, links by target, folders and special files
    by kind. Nothing is opened but regular files, so a FIFO cannot block it."""
    state = {}
    for folder, directories, names in os.walk(root):
        for name in directories + names:
            path = Path(folder) / name
            info = path.lstat()
            key = path.relative_to(root).as_posix()
            if stat.S_ISLNK(info.st_mode):
                state[key] = ("link", os.readlink(path))
            elif stat.S_ISREG(info.st_mode):
                state[key] = ("file", hashlib.sha256(path.read_bytes()).hexdigest())
            else:
                state[key] = ("kind", stat.S_IFMT(info.st_mode))
    return state
