"""Where lns-surgery may write, and how. Every command that writes a folder goes through here.

The rule, checked before anything slow runs:

- ``--out`` may not be an input, contain one, or lie inside one (model, data, tokenizer, adapter, source
  checkpoint), with symbolic links resolved: writing there would change or, with ``--overwrite``,
  delete what the command reads.
- ``--overwrite`` replaces only an empty folder or one this tool wrote, which it recognises by the
  marker file ``.lns-surgery-output`` that every output carries. Anything else stays untouched.
- The output is built in a hidden ``.NAME.lns-tmp-PID-XXXX`` folder beside ``--out`` and renamed to
  ``--out`` at the end, so a crash never leaves half an output there. That folder's marker is locked
  (``flock``) by the process writing it. The kernel releases the lock however the process ends,
  SIGKILL included, so the next run beside the same ``--out`` can tell a dead writer's leftovers
  from a live one's and removes the former, saying so in one line.

Scratch folders in the system temp dir (``push`` stages its upload and runs its load check there) get
the same locked marker, so the next scratch folder removes those that killed runs left behind.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import re
import secrets
import shutil
import socket
import tempfile
from collections.abc import Iterable
from pathlib import Path

from lns_surgery.core.errors import LNSError

logger = logging.getLogger(__name__)

MARKER_NAME = ".lns-surgery-output"
_TEMPORARY = "lns-tmp"  # the output being written
_DISCARDED = "lns-old"  # the previous output, between the swap and its removal


# --- the rule -------------------------------------------------------------------------------------


def local_inputs(*candidates) -> list[Path]:
    """The candidates that are files or folders on this machine (Hub ids and None are left out)."""
    found = []
    for candidate in candidates:
        if candidate is None or not isinstance(candidate, (str, os.PathLike)) or not str(candidate).strip():
            continue
        path = Path(candidate).expanduser()
        if path.exists():
            found.append(path)
    return found


def is_replaceable(folder: Path) -> bool:
    """Whether ``--overwrite`` may replace ``folder``: an empty folder, or one this tool wrote."""
    folder = Path(folder)
    if not folder.is_dir() or folder.is_symlink():
        return False
    marker = folder / MARKER_NAME
    if marker.is_file() and not marker.is_symlink():
        return True
    return not any(folder.iterdir())


def check_output(out, overwrite: bool = False, inputs: Iterable = (), *, report: bool = False,
                 flag: str = "--out") -> Path:
    """Refuse an output folder that would lose or change data; returns ``out`` as a Path.

    ``inputs`` are everything the command reads (paths that do not exist, such as Hub ids, are
    ignored). ``report`` also refuses a folder inside any model folder: a report belongs beside the
    models it describes, and one inside a model folder would be published with it. ``flag`` is how
    the command names its output in messages.
    """
    out = Path(out).expanduser()
    if out.is_symlink():
        raise LNSError(f"{flag} '{out}' is a symbolic link; give the folder itself")
    target = check_inputs(out, inputs, flag=flag)
    if report:
        model_folder = _enclosing_model_folder(target)
        if model_folder is not None:
            raise LNSError(f"{flag} '{out}' lies inside the model folder '{model_folder}'; "
                           "write reports beside models, not into them")
    if out.exists():
        if not out.is_dir():
            raise LNSError(f"'{out}' exists and is not a folder")
        if not overwrite:
            raise LNSError(f"'{out}' already exists; pass --overwrite to replace it")
        if not is_replaceable(out):
            raise LNSError(f"'{out}' is not empty and was not written by lns-surgery (it has no {MARKER_NAME}); "
                           f"--overwrite replaces only lns-surgery's own output: move it away or choose another {flag}")
    return out


def check_inputs(out: Path, inputs: Iterable, flag: str = "--out") -> Path:
    """Refuse an ``out`` that is, contains or lies inside one of ``inputs``; returns ``out`` resolved."""
    out = Path(out).expanduser()
    target = out.resolve()
    for source in local_inputs(*inputs):
        real = source.resolve()
        if target == real:
            raise LNSError(f"{flag} '{out}' is the input '{source}' itself; write the output to a new folder")
        if target in real.parents:
            raise LNSError(f"{flag} '{out}' contains the input '{source}'; write the output to a folder of its own")
        if real in target.parents:
            raise LNSError(f"{flag} '{out}' lies inside the input '{source}'; write the output outside it")
    return target


def _enclosing_model_folder(target: Path) -> Path | None:
    """The nearest existing folder at or above ``target`` that is a Hugging Face model folder."""
    for folder in (target, *target.parents):
        if (folder / "config.json").is_file() and any(
            (folder / name).exists() for name in ("model.safetensors", "model.safetensors.index.json",
                                                  "pytorch_model.bin", "pytorch_model.bin.index.json")
        ):
            return folder
    return None


# --- the marker -----------------------------------------------------------------------------------


def _marker_document() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    try:
        tool_version = version("lns-surgery")
    except PackageNotFoundError:
        tool_version = None
    return {"written_by": "lns-surgery", "version": tool_version, "pid": os.getpid(), "host": socket.gethostname()}


def mark_output(folder: Path) -> None:
    """Label ``folder`` as this tool's output, so that a later ``--overwrite`` may replace it."""
    marker = Path(folder) / MARKER_NAME
    marker.write_text(json.dumps(_marker_document()) + "\n", encoding="utf-8")


def remove_output(folder: Path) -> None:
    """Delete an output folder, but only one that ``--overwrite`` may replace."""
    folder = Path(folder)
    if not folder.exists():
        return
    if not is_replaceable(folder):
        raise LNSError(f"'{folder}' is not empty and was not written by lns-surgery (it has no {MARKER_NAME}); "
                       "it was left as it is")
    shutil.rmtree(folder)


_NO_LOCKS = (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL)  # filesystems without flock (some network mounts)


def _claim(folder: Path):
    """Write the marker into ``folder`` and hold an exclusive lock on it; returns the open file."""
    handle = open(folder / MARKER_NAME, "w", encoding="utf-8")
    try:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:  # no locks here: leftovers are then recognised by the process id alone
            if exc.errno not in _NO_LOCKS:
                raise
        handle.write(json.dumps(_marker_document()) + "\n")
        handle.flush()
    except BaseException:
        handle.close()
        raise
    return handle


# --- leftovers of runs that were stopped ----------------------------------------------------------


def _pid_in_name(name: str) -> int | None:
    parts = name.rsplit("-", 2)  # ".out.lns-tmp-1234-ab12cd34", "lns-publish-1234-ab12cd34"
    return int(parts[1]) if len(parts) == 3 and parts[1].isdigit() else None


def process_alive(pid: int | None) -> bool:
    """Whether process ``pid`` still runs (True when it cannot be told)."""
    if pid is None:
        return True  # cannot tell: leave it
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _writer_gone(folder: Path, locked_marker: bool) -> bool:
    """Whether the process that left ``folder`` has ended. ``locked_marker``: the folder is an output
    being written or a scratch folder, whose writer holds a lock on its marker for as long as it lives."""
    marker = folder / MARKER_NAME
    if locked_marker and marker.is_file():
        try:
            with open(marker, "rb") as handle:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                return True  # nobody holds it: its writer is gone (the lock dies with the process)
        except BlockingIOError:
            return False
        except OSError as exc:
            if exc.errno not in _NO_LOCKS:
                return False
    # No lock to ask (killed right after creating the folder, a filesystem without locks, or a
    # discarded previous output): ask whether the process named in the folder's name still runs.
    return not process_alive(_pid_in_name(folder.name))


def remove_stale_temporaries(out: Path) -> list[Path]:
    """Remove the temporary folders that stopped runs left beside ``out``; says so in one line."""
    out = Path(out)
    if not out.parent.is_dir():
        return []
    being_written, discarded = f".{out.name}.{_TEMPORARY}-", f".{out.name}.{_DISCARDED}-"
    candidates = [(entry, entry.name.startswith(being_written)) for entry in sorted(out.parent.iterdir())
                  if entry.name.startswith((being_written, discarded)) and entry.is_dir() and not entry.is_symlink()]
    return _remove_left_behind(candidates, "temporary folder(s)", f"beside '{out}'")


def _remove_left_behind(candidates: list[tuple[Path, bool]], what: str, where: str) -> list[Path]:
    """Remove each ``(folder, locked_marker)`` whose writer is gone (see ``_writer_gone``); one warning line."""
    removed = []
    for folder, locked_marker in candidates:
        if _writer_gone(folder, locked_marker=locked_marker):
            shutil.rmtree(folder, ignore_errors=True)
            if not folder.exists():
                removed.append(folder)
    if removed:
        logger.warning("removed %d %s that stopped runs left %s: %s",
                       len(removed), what, where, ", ".join(path.name for path in removed))
    return removed


# --- writing --------------------------------------------------------------------------------------


@contextlib.contextmanager
def atomic_output_dir(out, overwrite: bool = False, inputs: Iterable = (), *, report: bool = False):
    """Yield a temporary folder beside ``out`` that becomes ``out`` only if the block finishes.

    The rule above is checked first. An error, Ctrl-C or SIGTERM (the CLI turns it into an
    exception) removes the temporary folder; after SIGKILL the next run removes it.
    """
    out = check_output(out, overwrite, list(inputs), report=report)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out)
    suffix = f"{os.getpid()}-{secrets.token_hex(4)}"
    temporary = out.parent / f".{out.name}.{_TEMPORARY}-{suffix}"
    temporary.mkdir()
    claim = None
    try:
        claim = _claim(temporary)
        yield temporary
        if out.exists():
            if not is_replaceable(out):  # it changed while the output was being written
                raise LNSError(f"'{out}' changed while the output was written and is no longer lns-surgery's; "
                               "it was left as it is")
            discarded = out.parent / f".{out.name}.{_DISCARDED}-{suffix}"
            os.rename(out, discarded)
            os.rename(temporary, out)
            shutil.rmtree(discarded, ignore_errors=True)
        else:
            os.rename(temporary, out)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    finally:
        if claim is not None:
            claim.close()


# --- scratch folders ------------------------------------------------------------------------------

# "lns-<purpose>-<pid>-<8 hex digits>", as scratch_dir names them
_SCRATCH_NAME = re.compile(r"^lns-[a-z][a-z-]*-\d+-[0-9a-f]{8}$")


def remove_stale_scratch(root: Path | None = None) -> list[Path]:
    """Remove the scratch folders that stopped runs of this user left in ``root`` (default: the system
    temp dir); says so in one line. Only folders named and marked by ``scratch_dir`` are considered."""
    root = Path(root or tempfile.gettempdir())
    try:
        entries = sorted(root.iterdir())
    except OSError:
        return []
    candidates = []
    for entry in entries:
        if not _SCRATCH_NAME.match(entry.name) or entry.is_symlink() or not entry.is_dir():
            continue
        try:  # the temp dir is shared: another user's folders are theirs to clean
            if entry.stat().st_uid != os.getuid() or not (entry / MARKER_NAME).is_file():
                continue
        except OSError:
            continue
        candidates.append((entry, True))
    return _remove_left_behind(candidates, "scratch folder(s)", f"in '{root}'")


@contextlib.contextmanager
def scratch_dir(purpose: str):
    """Yield a private folder ``lns-<purpose>-PID-XXXXXXXX`` in the system temp dir, removed when the
    block ends, however it ends.

    A SIGKILL cannot remove it, so it carries the output marker, locked while this process lives, and
    every new scratch folder first removes those whose process is gone (``remove_stale_scratch``).
    A folder that is handed on whole (an upload) belongs in a sub-folder, without the marker.
    """
    root = Path(tempfile.gettempdir())
    folder = root / f"lns-{purpose}-{os.getpid()}-{secrets.token_hex(4)}"
    if not _SCRATCH_NAME.match(folder.name):  # a name the sweep would not recognise would stay forever
        raise ValueError(f"scratch purpose {purpose!r} must be lower-case words joined by '-'")
    remove_stale_scratch(root)
    folder.mkdir(mode=0o700)
    claim = None
    try:
        claim = _claim(folder)
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)
        if claim is not None:  # released last, so a sweep never sees a live folder unlocked
            claim.close()
