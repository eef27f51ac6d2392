"""Where lns-surgery may write, and how. Every command that writes a folder goes through here.

The rule, checked before anything slow runs:

- ``--out`` may not be an input, contain one, or lie inside one (model, data, tokenizer, adapter, source
  checkpoint), with symbolic links resolved: writing there would change or, with ``--overwrite``,
  delete what the command reads.
- ``--out``'s parent must be writable (and, where the command knows the size of what it writes, hold
  enough free space), so a read-only or full destination is refused before the work, not after it.
- Every output carries the marker file ``.lns-surgery-output``: a manifest of every entry the tool wrote
  there (path, size, content digest), written last, once everything else is in place. ``--overwrite``
  replaces only an empty folder or one whose contents match its manifest: a file added, changed or
  replaced since (or a marker without a manifest, as older versions wrote) makes it refuse, naming the
  files, and the folder stays as it is.
- One run at a time per ``--out``: the run holds ``flock`` on ``.NAME.lns-lock`` beside it while it writes,
  and a second run refuses in one line. The lock file is removed when the run ends (a killed run's is
  reused and removed by the next).
- The output is built in a hidden ``.NAME.lns-tmp-PID-XXXXXXXX`` folder beside ``--out`` and renamed to
  ``--out`` at the end (never onto a folder that appeared meanwhile), so a crash never leaves half an
  output there. With ``--overwrite`` the previous output is first moved aside to ``.NAME.lns-old-...``
  and removed only once the new one is in place; a run killed between the two renames leaves it there,
  and the next run beside the same ``--out`` puts it back.
- The folders of a run in progress carry the marker, locked (``flock``) by the process writing it. The
  kernel releases the lock however the process ends, SIGKILL included, so the next run can tell a dead
  writer's leftovers from a live one's and removes the former, saying so in one line. A folder whose name
  merely looks like one of these is never touched: it needs this tool's marker, with its manifest.

Scratch folders in the system temp dir (``push`` stages its upload and runs its load check there) get
the same locked marker, so the next scratch folder removes those that killed runs left behind.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import socket
import stat
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path

from lns_surgery.core.errors import LNSError

logger = logging.getLogger(__name__)

MARKER_NAME = ".lns-surgery-output"
MARKER_FORMAT = 2  # 2: the marker holds the manifest ("files"); older markers were a bare label
_TEMPORARY = "lns-tmp"  # the output being written
_DISCARDED = "lns-old"  # the previous output, between the swap and its removal
_LOCK = "lns-lock"  # beside --out, held for the whole write

_NO_LOCKS = (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL)  # filesystems without flock (some network mounts)
_NO_ROOM = (errno.ENOSPC, errno.EDQUOT)


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
    """Whether ``--overwrite`` may replace ``folder``: an empty folder, or one this tool wrote, unchanged."""
    return _replace_problem(Path(folder)) is None


def check_output(out, overwrite: bool = False, inputs: Iterable = (), *, report: bool = False,
                 flag: str = "--out") -> Path:
    """Refuse an output folder that would lose or change data; returns ``out`` as a Path.

    ``inputs`` are everything the command reads (paths that do not exist, such as Hub ids, are
    ignored). ``report`` also refuses a folder inside any model folder: a report belongs beside the
    models it describes, and one inside a model folder would be published with it. ``flag`` is how
    the command names its output in messages. A previous output that a killed run had moved aside is
    put back first, so that what exists is judged, not what a crash left.
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
    busy = _lock_holder(out)
    if busy is not None:
        raise _busy_error(out, busy, flag)
    restore_moved_aside(out)  # what killed runs left beside out: the previous output back, the rest away
    remove_stale_temporaries(out)
    _remove_stale_lock(out)
    if out.exists():
        if not out.is_dir():
            raise LNSError(f"'{out}' exists and is not a folder")
        if not overwrite:
            raise LNSError(f"'{out}' already exists; pass --overwrite to replace it")
        problem = _replace_problem(out, flag)
        if problem:
            raise LNSError(problem)
    check_destination(out, flag=flag)
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


# --- the destination ------------------------------------------------------------------------------


def _existing_ancestor(path: Path) -> Path:
    path = Path(os.path.abspath(path))
    while not os.path.lexists(path) and path != path.parent:
        path = path.parent
    return path


def check_destination(out, *, flag: str = "--out") -> Path:
    """Refuse an ``out`` whose parent folder cannot be written (or created); returns that existing folder."""
    out = Path(out).expanduser()
    parent = _existing_ancestor(out.parent)
    if not parent.is_dir():
        raise LNSError(f"cannot write {flag} '{out}': '{parent}' is not a folder")
    try:
        read_only = bool(os.statvfs(parent).f_flag & os.ST_RDONLY)
    except OSError:
        read_only = False
    if read_only:
        raise LNSError(f"cannot write {flag} '{out}': '{parent}' is on a read-only filesystem; choose another {flag}")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise LNSError(f"cannot write {flag} '{out}': '{parent}' is not writable by this user; choose another {flag}")
    return parent


def same_filesystem(a, b) -> bool:
    """Whether ``a`` and the nearest existing folder at or above ``b`` are on one filesystem."""
    try:
        return os.stat(a).st_dev == os.stat(_existing_ancestor(Path(b))).st_dev
    except OSError:
        return False


def _size(count: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if count >= scale:
            return f"{count / scale:.1f} {unit}"
    return f"{count} bytes"


def check_room(out, needed: int, *, flag: str = "--out") -> None:
    """Refuse an ``out`` whose filesystem has less than ``needed`` bytes free (0: nothing known to check)."""
    if needed <= 0:
        return
    parent = _existing_ancestor(Path(out).expanduser().parent)
    try:
        free = shutil.disk_usage(parent).free
    except OSError:
        return
    if free < needed:
        raise LNSError(f"not enough free space for {flag} '{out}': the output needs about {_size(needed)} and "
                       f"'{parent}' has {_size(free)} free; free some space or choose another {flag}")


def _write_error(out: Path, exc: OSError, flag: str) -> LNSError:
    """A destination that failed while being written, as one line."""
    where = f": {os.fsdecode(exc.filename)}" if exc.filename else ""
    if exc.errno in _NO_ROOM:
        return LNSError(f"no space left where {flag} '{out}' is written ({exc.strerror}{where}); nothing was "
                        f"written there: free some space or choose another {flag}")
    return LNSError(f"cannot write {flag} '{out}' ({exc.strerror}{where}); nothing was written there")


def _is_write_error(exc: BaseException, out: Path, temporary: Path | None = None) -> bool:
    """Whether ``exc`` is the destination failing (full, read-only, not writable) rather than a bug or
    an unreadable input: out of space anywhere, or refused on ``out``, its temporary folder or the
    tool's other files beside it."""
    if not isinstance(exc, OSError):
        return False
    if exc.errno in _NO_ROOM:
        return True
    if exc.errno not in (errno.EROFS, errno.EACCES, errno.EPERM) or not exc.filename:
        return False
    where = Path(os.path.abspath(os.fsdecode(exc.filename)))
    out = Path(os.path.abspath(out))
    if temporary is not None and (where == Path(os.path.abspath(temporary))
                                  or Path(os.path.abspath(temporary)) in where.parents):
        return True
    return where.parent == out.parent and (where.name == out.name or where.name.startswith(f".{out.name}."))


# --- the manifest ---------------------------------------------------------------------------------

# Files up to this size are hashed whole. Larger ones (weights, optimizer states) are recorded by size,
# modification time and the sha256 of their first and last MiB: hashing a multi-GB checkpoint in full
# would double the I/O of a conversion (it is read again whenever --overwrite checks it), and anything
# that rewrites a weight file in place changes its modification time. A copy that does not keep
# modification times (`cp -r` without -p) is then "changed" for its large files: --overwrite refuses
# it, which is the safe side.
_WHOLE_FILE_LIMIT = 64 * 2**20
_END_BYTES = 2**20
_digests: dict[tuple, str] = {}  # (device, inode, size, mtime, ctime, whole) -> digest, for this process


def _digest(path: Path, info: os.stat_result, whole: bool) -> str:
    # ctime cannot be set by a user and changes with every write, so a cached digest is never stale
    key = (info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns, whole)
    if key in _digests:
        return _digests[key]
    digest = hashlib.sha256()
    descriptor = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)  # never blocks on a FIFO
    with os.fdopen(descriptor, "rb") as handle:
        if not stat.S_ISREG(os.fstat(handle.fileno()).st_mode):
            raise OSError(errno.EINVAL, "not a regular file", str(path))
        if whole:
            while chunk := handle.read(2**20):
                digest.update(chunk)
        else:
            digest.update(handle.read(_END_BYTES))
            handle.seek(max(0, info.st_size - _END_BYTES))
            digest.update(handle.read(_END_BYTES))
    _digests[key] = digest.hexdigest()
    return _digests[key]


def _record(path: Path, info: os.stat_result) -> dict | None:
    """How the manifest describes one entry (None: a special file, which the tool never writes)."""
    if stat.S_ISDIR(info.st_mode):
        return {"kind": "dir"}
    if stat.S_ISLNK(info.st_mode):
        return {"kind": "link", "target": os.readlink(path)}
    if not stat.S_ISREG(info.st_mode):
        return None
    if info.st_size <= _WHOLE_FILE_LIMIT:
        return {"kind": "file", "size": info.st_size, "sha256": _digest(path, info, True)}
    return {"kind": "file", "size": info.st_size, "mtime_ns": info.st_mtime_ns,
            "sha256_ends": _digest(path, info, False)}


def _unchanged(record, path: Path, info: os.stat_result) -> bool:
    if not isinstance(record, dict):
        return False
    kind = record.get("kind")
    if kind == "dir":
        return stat.S_ISDIR(info.st_mode)
    if kind == "link":
        return stat.S_ISLNK(info.st_mode) and os.readlink(path) == record.get("target")
    if kind != "file" or not stat.S_ISREG(info.st_mode) or info.st_size != record.get("size"):
        return False
    if "mtime_ns" in record and info.st_mtime_ns != record["mtime_ns"]:
        return False
    whole = "sha256" in record
    try:
        return _digest(path, info, whole) == record.get("sha256" if whole else "sha256_ends")
    except OSError:
        return False


def _entries(folder: Path):
    """(relative path, path, lstat) of every entry below ``folder`` but its own marker; ``send(False)``
    after an entry that is a folder skips what is inside it."""
    stack = [(folder, "")]
    while stack:
        here, prefix = stack.pop()
        with os.scandir(here) as listing:
            found = sorted(listing, key=lambda entry: entry.name)
        for entry in found:
            if not prefix and entry.name == MARKER_NAME:
                continue
            info = entry.stat(follow_symlinks=False)
            descend = yield prefix + entry.name, Path(entry.path), info
            if stat.S_ISDIR(info.st_mode) and descend is not False:
                stack.append((Path(entry.path), prefix + entry.name + "/"))


def manifest(folder: Path) -> dict:
    """Every entry below ``folder`` (but the marker), as the marker records it."""
    files = {}
    for relative, path, info in _entries(Path(folder)):
        record = _record(path, info)
        if record is not None:
            files[relative] = record
    return files


# A training run's working folder (``<output_dir>.incomplete``) fills while it runs: its marker lists
# nothing, and what the trainer writes there (checkpoints, TensorBoard logs, the metrics a diverged run
# keeps) counts as the tool's. Anything else in it is the user's.
_TRAINER_ENTRIES = re.compile(r"^(checkpoint-\d+|runs|metrics\.json)$")


def _differences(folder: Path, document: dict) -> tuple[list[str], list[str]]:
    """(entries the manifest does not list, entries that differ from it). A listed file that is gone
    counts as neither: deleting what remains loses nothing the tool did not write."""
    files = document.get("files") or {}
    working = document.get("state") == "working"
    foreign, changed = [], []
    walk = _entries(folder)
    try:
        item = next(walk)
        while True:
            relative, path, info = item
            descend = True
            record = files.get(relative)
            if working and "/" not in relative and _TRAINER_ENTRIES.match(relative):
                descend = False
            elif record is None:
                foreign.append(relative + "/" if stat.S_ISDIR(info.st_mode) else relative)
                descend = False
            elif not _unchanged(record, path, info):
                changed.append(relative)
                descend = False
            item = walk.send(descend)
    except StopIteration:
        pass
    return foreign, changed


def _few(names: list[str], shown: int = 3) -> str:
    listed = ", ".join(names[:shown])
    return listed + (f", and {len(names) - shown} more" if len(names) > shown else "")


def _tool_marker(folder: Path) -> dict | None:
    """``folder``'s marker if it is this tool's, with a manifest; None for none, another's, or an old one."""
    marker = Path(folder) / MARKER_NAME
    try:
        info = marker.lstat()
        if not stat.S_ISREG(info.st_mode) or info.st_size > 256 * 2**20:
            return None
        document = json.loads(marker.read_bytes())
    except (OSError, ValueError):
        return None
    if (not isinstance(document, dict) or document.get("written_by") != "lns-surgery"
            or document.get("format") != MARKER_FORMAT or not isinstance(document.get("files"), dict)):
        return None
    return document


def _replace_problem(folder: Path, flag: str = "--out") -> str | None:
    """Why ``--overwrite`` may not replace ``folder`` (one line), or None when it may."""
    if folder.is_symlink() or not folder.is_dir():
        return f"'{folder}' is not a folder"
    try:
        if not any(folder.iterdir()):
            return None
    except OSError as exc:
        return f"'{folder}' cannot be read ({exc.strerror}); it was left as it is"
    if not os.path.lexists(folder / MARKER_NAME):
        return (f"'{folder}' is not empty and was not written by lns-surgery (it has no {MARKER_NAME}); "
                f"--overwrite replaces only lns-surgery's own output: move it away or choose another {flag}")
    document = _tool_marker(folder)
    if document is None:
        return (f"'{folder}' has a {MARKER_NAME} without the list of the files lns-surgery wrote (an older "
                "version's, or not lns-surgery's), so --overwrite cannot tell its files from yours: delete the "
                f"folder by hand if nothing in it is needed, or choose another {flag}")
    try:
        foreign, changed = _differences(folder, document)
    except OSError as exc:
        return f"'{folder}' cannot be read ({exc.strerror}); it was left as it is"
    if not foreign and not changed:
        return None
    parts = []
    if foreign:
        parts.append(f"files lns-surgery did not write ({_few(foreign)})")
    if changed:
        parts.append(f"files changed since lns-surgery wrote them ({_few(changed)})")
    return (f"'{folder}' holds {' and '.join(parts)}; --overwrite replaces only lns-surgery's own output as it "
            f"wrote it: move those away or choose another {flag}")


def _marker_document(state: str, files: dict, **extra) -> dict:
    from importlib.metadata import PackageNotFoundError, version

    try:
        tool_version = version("lns-surgery")
    except PackageNotFoundError:
        tool_version = None
    return {"written_by": "lns-surgery", "format": MARKER_FORMAT, "version": tool_version, "state": state,
            "pid": os.getpid(), "host": socket.gethostname(), **extra, "files": files}


def mark_output(folder: Path, *, working: bool = False, replaces: str | None = None) -> None:
    """Label ``folder`` as this tool's, so that a later ``--overwrite`` may replace it: its marker lists
    every entry in it now, so call it last, once everything is written. ``working``: a training run's
    working folder, which fills after it is marked (see ``_TRAINER_ENTRIES``)."""
    folder = Path(folder)
    document = _marker_document("working", {}) if working else _marker_document("complete", manifest(folder))
    if replaces:
        document["replaces"] = replaces
    staged = folder / f"{MARKER_NAME}.{os.getpid()}"  # written whole, then renamed: never half a marker
    try:
        staged.write_text(json.dumps(document) + "\n", encoding="utf-8")
        os.replace(staged, folder / MARKER_NAME)
    except BaseException:
        staged.unlink(missing_ok=True)
        raise


def remove_output(folder: Path, *, flag: str = "--out") -> None:
    """Delete an output folder, but only one that ``--overwrite`` may replace."""
    folder = Path(folder)
    if not folder.exists() and not folder.is_symlink():
        return
    problem = _replace_problem(folder, flag)
    if problem:
        raise LNSError(problem)
    _remove_marker_last(folder)


def remove_working_folder(folder: Path) -> bool:
    """Delete a training run's working folder that holds only what the run wrote; anything else (a
    finished output waiting to be renamed, a file of the user's) keeps it. Never raises: it runs while
    another error is on its way to the user. Returns whether it was removed."""
    folder = Path(folder)
    document = _tool_marker(folder)
    try:
        if document is not None and document.get("state") == "complete":
            logger.warning("kept '%s': it holds this run's finished output", folder)
            return False
        if document is None or document.get("state") != "working" or _replace_problem(folder) is not None:
            logger.warning("kept '%s': it holds files this run did not write", folder)
            return False
        _remove_marker_last(folder)
        return True
    except OSError as exc:
        logger.warning("could not remove '%s': %s", folder, exc)
        return False


def _remove_marker_last(folder: Path) -> None:
    """Remove ``folder``, its marker last: a removal stopped halfway leaves a folder the sweeps still
    recognise as the tool's, never an unmarked one they must leave forever."""
    with os.scandir(folder) as listing:
        entries = [entry for entry in listing if entry.name != MARKER_NAME]
    for entry in entries:
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(entry.path)
        else:
            os.unlink(entry.path)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(folder / MARKER_NAME)
    os.rmdir(folder)


# --- one run per --out ----------------------------------------------------------------------------

_held: dict[str, list] = {}  # lock path -> [descriptor, depth, folders created for it]


def _lock_path(out: Path) -> Path:
    out = Path(os.path.abspath(Path(out).expanduser()))
    return out.parent / f".{out.name}.{_LOCK}"


def _same_file(descriptor: int, path: Path) -> bool:
    try:
        here, there = os.fstat(descriptor), os.stat(path, follow_symlinks=False)
    except OSError:
        return False
    return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)


def _pid_in_file(descriptor: int) -> int | None:
    try:
        text = os.pread(descriptor, 64, 0).decode("ascii", "replace").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _lock_holder(out: Path) -> int | None:
    """The process holding ``out``'s lock (0 when it cannot be told), or None when it is free or ours."""
    path = _lock_path(out)
    if str(path) in _held:
        return None
    try:
        descriptor = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        fcntl.flock(descriptor, fcntl.LOCK_SH | fcntl.LOCK_NB)  # shared: a look, not a claim
        return None
    except BlockingIOError:
        return _pid_in_file(descriptor) or 0
    except OSError:
        return None
    finally:
        os.close(descriptor)


def _remove_stale_lock(out: Path) -> None:
    """Remove the lock file a killed run left beside ``out`` (nobody holds it)."""
    path = _lock_path(out)
    if str(path) in _held:
        return
    try:
        descriptor = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return
    try:
        if stat.S_ISREG(os.fstat(descriptor).st_mode):
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if _same_file(descriptor, path):
                os.unlink(path)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def _busy_error(out: Path, pid: int, flag: str) -> LNSError:
    who = f"another lns-surgery run (process {pid})" if pid else "another lns-surgery run"
    return LNSError(f"{who} is writing '{out}'; wait for it to finish or choose another {flag}")


def _make_parents(folder: Path) -> list[Path]:
    """Create ``folder`` and its missing parents; returns those created, deepest first."""
    created = []
    path = Path(os.path.abspath(folder))
    while not os.path.lexists(path):
        created.append(path)
        path = path.parent
    for path in reversed(created):
        with contextlib.suppress(FileExistsError):
            path.mkdir()
    return created


def _remove_if_empty(folders: list[Path]) -> None:
    for folder in folders:  # deepest first; stops at the first that holds something
        try:
            folder.rmdir()
        except OSError:
            return


def lock_output(out, *, flag: str = "--out") -> None:
    """Hold ``.NAME.lns-lock`` beside ``out`` until ``unlock_output``: a second run that wants to write
    ``out`` meanwhile refuses in one line. Nested calls in one process share the lock."""
    out = Path(out).expanduser()
    path = _lock_path(out)
    if str(path) in _held:
        _held[str(path)][1] += 1
        return
    check_destination(out, flag=flag)
    try:
        created = _make_parents(path.parent)
    except OSError as exc:
        raise _write_error(out, exc, flag) from None
    try:
        descriptor = _acquire(path, out, flag)
    except BaseException:
        _remove_if_empty(created)
        raise
    _held[str(path)] = [descriptor, 1, created]


def _acquire(path: Path, out: Path, flag: str) -> int:
    waited = 0.0
    while True:
        try:
            descriptor = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise LNSError(f"'{path}' is a symbolic link; remove it (lns-surgery keeps its lock for "
                               f"'{out}' there)") from None
            raise _write_error(out, exc, flag) from None
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _pid_in_file(descriptor)
            os.close(descriptor)
            if waited < 0.5:  # another run's look (check_output's) lasts microseconds; a run, seconds
                time.sleep(0.02)
                waited += 0.02
                continue
            raise _busy_error(out, holder or 0, flag) from None
        except OSError as exc:
            if exc.errno not in _NO_LOCKS:
                os.close(descriptor)
                raise
            holder = _pid_in_file(descriptor)  # no locks here: the process id in the file is all there is
            if holder and holder != os.getpid() and process_alive(holder):
                os.close(descriptor)
                raise _busy_error(out, holder, flag) from None
        if not _same_file(descriptor, path):  # the holder before us removed it as we opened it: again
            os.close(descriptor)
            continue
        os.ftruncate(descriptor, 0)
        os.pwrite(descriptor, f"{os.getpid()}\n".encode(), 0)
        return descriptor


def unlock_output(out) -> None:
    """Release what ``lock_output`` took (the last release removes the lock file); nothing if not held."""
    if out is None:
        return
    path = _lock_path(Path(out))
    entry = _held.get(str(path))
    if entry is None:
        return
    entry[1] -= 1
    if entry[1] > 0:
        return
    del _held[str(path)]
    descriptor, _, created = entry
    try:
        if _same_file(descriptor, path):  # removed while held, so no one can be waiting on a stale file
            with contextlib.suppress(OSError):
                os.unlink(path)
    finally:
        os.close(descriptor)
        _remove_if_empty(created)


# --- renaming -------------------------------------------------------------------------------------

_RENAME_NOREPLACE = 1
_AT_FDCWD = -100
_renameat2 = None


def _rename_noreplace(source: Path, target: Path) -> None:
    """Rename ``source`` to ``target``, failing with FileExistsError if ``target`` exists (a plain
    rename would replace an empty folder there without a word)."""
    global _renameat2
    if _renameat2 is None:
        import ctypes

        try:
            function = ctypes.CDLL(None, use_errno=True).renameat2
            function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
            _renameat2 = function
        except (OSError, AttributeError):
            _renameat2 = False
    if _renameat2:
        import ctypes

        if _renameat2(_AT_FDCWD, os.fsencode(source), _AT_FDCWD, os.fsencode(target), _RENAME_NOREPLACE) == 0:
            return
        code = ctypes.get_errno()
        if code not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):  # not this filesystem: below
            raise OSError(code, os.strerror(code), str(source), None, str(target))
    # No renameat2 here: the lock beside ``target`` keeps other lns-surgery runs out between look and rename.
    if os.path.lexists(target):
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(target))
    os.rename(source, target)


def _move_aside(out: Path, aside: Path) -> None:
    _rename_noreplace(out, aside)


def _lock_marker(folder: Path):
    """Open ``folder``'s marker and lock it; returns the file, or None when another process holds it."""
    try:
        handle = open(folder / MARKER_NAME, "rb")
    except OSError:
        return None
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        return None
    except OSError as exc:
        if exc.errno not in _NO_LOCKS:
            handle.close()
            return None
    return handle


def _install(folder: Path, out: Path, overwrite: bool, flag: str, aside: Path) -> None:
    """Rename the finished ``folder`` to ``out``. An ``out`` there now is replaced only with ``overwrite``
    and only if ``--overwrite`` may replace it; it is moved to ``aside`` first and removed last, so no
    moment is without one of the two (see ``restore_moved_aside``). Call it holding ``out``'s lock."""
    held = None
    moved = False
    if os.path.lexists(out):
        if not overwrite:
            raise LNSError(f"'{out}' appeared while the output was written; it was left as it is and nothing "
                           f"was written (pass --overwrite to replace it)")
        problem = _replace_problem(out, flag)
        if problem:
            raise LNSError(problem)
        if not os.path.lexists(out / MARKER_NAME):  # an empty folder: fails if anything appeared in it
            try:
                out.rmdir()
            except OSError:
                raise LNSError(f"'{out}' changed while the output was written; it was left as it is") from None
        else:
            held = _lock_marker(out)  # the folder moved aside is locked for as long as this process has it
            if held is None:
                raise LNSError(f"'{out}' is being replaced by another process; it was left as it is")
            _move_aside(out, aside)
            moved = True
    try:
        try:
            _rename_noreplace(folder, out)
        except FileExistsError:
            raise LNSError(f"'{out}' appeared while the output was written; it was left as it is") from None
        except BaseException:
            if moved:
                with contextlib.suppress(OSError):
                    _rename_noreplace(aside, out)
                    moved = False
            raise
        if moved:
            _remove_marker_last(aside)
    finally:
        if held is not None:
            held.close()


def replace_output(folder, out, *, overwrite: bool = False, flag: str = "--out") -> None:
    """Make ``folder``, a finished output this tool wrote beside ``out`` (a training run's working
    folder), into ``out``: its manifest is written now, last, and it is renamed as ``atomic_output_dir``
    renames its temporary folder."""
    folder, out = Path(folder), Path(out).expanduser()
    lock_output(out, flag=flag)
    try:
        restore_moved_aside(out)
        aside = out.parent / f".{out.name}.{_DISCARDED}-{os.getpid()}-{secrets.token_hex(4)}"
        mark_output(folder, replaces=aside.name)
        _install(folder, out, overwrite, flag, aside)
    except OSError as exc:
        if _is_write_error(exc, out):
            raise _write_error(out, exc, flag) from None
        raise
    finally:
        unlock_output(out)


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


def _claim_if_abandoned(folder: Path):
    """Lock ``folder``'s marker if the folder is this tool's (a marker with a manifest) and the process
    that wrote it is gone; returns the open marker (close it when done), else None."""
    if _tool_marker(folder) is None:
        return None
    try:
        handle = open(folder / MARKER_NAME, "rb")
    except OSError:
        return None
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        return handle  # nobody holds it: its writer is gone (the lock dies with the process)
    except BlockingIOError:
        pass
    except OSError as exc:  # no locks here: ask whether the process named in the folder's name still runs
        if exc.errno in _NO_LOCKS and not process_alive(_pid_in_name(folder.name)):
            return handle
    handle.close()
    return None


def _left_beside(out: Path, kind: str) -> list[Path]:
    """The folders named like this tool's ``kind`` folders for ``out`` (owned by this user)."""
    out = Path(out)
    pattern = re.compile(rf"^\.{re.escape(out.name)}\.{kind}-\d+-[0-9a-f]{{8}}$")
    try:
        entries = sorted(out.parent.iterdir())
    except OSError:
        return []
    found = []
    for entry in entries:
        try:
            info = entry.lstat()
        except OSError:
            continue
        if pattern.match(entry.name) and stat.S_ISDIR(info.st_mode) and info.st_uid == os.geteuid():
            found.append(entry)
    return found


_kept: set[str] = set()  # moved-aside outputs already reported as kept, so each is reported once


def _modified(path: Path) -> float:
    try:
        return path.lstat().st_mtime
    except OSError:
        return 0.0


def restore_moved_aside(out) -> list[Path]:
    """Deal with previous outputs that runs killed mid-swap left beside ``out`` as ``.NAME.lns-old-...``:
    put one back when ``out`` is missing; remove one that the output now at ``out`` replaced (its marker
    says so), if nothing in it changed; keep any other, saying where it is."""
    out = Path(out).expanduser()
    removed = []
    for aside in sorted(_left_beside(out, _DISCARDED), key=_modified, reverse=True):  # the newest goes back
        handle = _claim_if_abandoned(aside)
        if handle is None:
            continue  # not the tool's, or its process still has it
        try:
            if not os.path.lexists(out):
                try:
                    _rename_noreplace(aside, out)
                    logger.warning("restored '%s' from %s, where a stopped run had moved it aside", out, aside.name)
                    continue
                except OSError:
                    pass
            current = _tool_marker(out) if out.is_dir() else None
            replaced = current is not None and current.get("replaces") == aside.name
            if replaced and _replace_problem(aside) is None:
                _remove_marker_last(aside)
                removed.append(aside)
            elif str(aside) not in _kept:
                _kept.add(str(aside))
                logger.warning("kept %s beside '%s': a previous output that a stopped run moved aside, and not "
                               "the one the folder there now replaced; move it back by hand if you need it",
                               aside.name, out)
        except OSError:
            continue
        finally:
            handle.close()
    if removed:
        logger.warning("removed %d previous output(s) that stopped runs left beside '%s': %s",
                       len(removed), out, ", ".join(path.name for path in removed))
    return removed


def remove_stale_temporaries(out: Path) -> list[Path]:
    """Remove the temporary folders that stopped runs left beside ``out``; says so in one line. Only
    folders carrying this tool's marker (or empty ones whose process is gone) are removed."""
    return _remove_left_behind(_left_beside(Path(out), _TEMPORARY), "temporary folder(s)", f"beside '{out}'")


def _remove_left_behind(candidates: list[Path], what: str, where: str) -> list[Path]:
    removed = []
    for folder in candidates:
        try:
            if not any(folder.iterdir()):  # killed between creating it and marking it: nothing to lose
                if not process_alive(_pid_in_name(folder.name)):
                    folder.rmdir()
                    removed.append(folder)
                continue
        except OSError:
            continue
        handle = _claim_if_abandoned(folder)
        if handle is None:
            continue
        try:
            _remove_marker_last(folder)
            removed.append(folder)
        except OSError:
            pass
        finally:
            handle.close()
    if removed:
        logger.warning("removed %d %s that stopped runs left %s: %s",
                       len(removed), what, where, ", ".join(path.name for path in removed))
    return removed


def _claim(folder: Path):
    """Write the marker (an empty manifest: nothing written yet) into ``folder`` and hold an exclusive
    lock on it; returns the open file."""
    handle = open(folder / MARKER_NAME, "w", encoding="utf-8")
    try:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:  # no locks here: leftovers are then recognised by the process id alone
            if exc.errno not in _NO_LOCKS:
                raise
        handle.write(json.dumps(_marker_document("writing", {})) + "\n")
        handle.flush()
    except BaseException:
        handle.close()
        raise
    return handle


def _seal(claim, folder: Path, replaces: str) -> None:
    """Write the manifest into the claimed marker, through the locked file, so the lock is never let go."""
    document = _marker_document("complete", manifest(folder), replaces=replaces)
    claim.seek(0)
    claim.truncate()
    claim.write(json.dumps(document) + "\n")
    claim.flush()


# --- writing --------------------------------------------------------------------------------------


@contextlib.contextmanager
def atomic_output_dir(out, overwrite: bool = False, inputs: Iterable = (), *, report: bool = False,
                      flag: str = "--out"):
    """Yield a temporary folder beside ``out`` that becomes ``out`` only if the block finishes.

    The rule above is checked first, and again under ``out``'s lock. An error, Ctrl-C or SIGTERM (the
    CLI turns it into an exception) removes the temporary folder; after SIGKILL the next run removes it.
    A destination that fills up or refuses writes is one ``LNSError`` line, with nothing left behind.
    """
    out = check_output(out, overwrite, list(inputs), report=report, flag=flag)
    lock_output(out, flag=flag)
    temporary = claim = None
    try:
        restore_moved_aside(out)
        remove_stale_temporaries(out)
        check_output(out, overwrite, flag=flag)  # under the lock: what the first look saw may have changed
        suffix = f"{os.getpid()}-{secrets.token_hex(4)}"
        temporary = out.parent / f".{out.name}.{_TEMPORARY}-{suffix}"
        temporary.mkdir()
        claim = _claim(temporary)
        yield temporary
        aside = out.parent / f".{out.name}.{_DISCARDED}-{suffix}"
        _seal(claim, temporary, aside.name)
        _install(temporary, out, overwrite, flag, aside)
        temporary = None
    except BaseException as exc:
        if temporary is not None:
            with contextlib.suppress(OSError):
                _remove_marker_last(temporary)
        if _is_write_error(exc, out, temporary):
            raise _write_error(out, exc, flag) from None
        raise
    finally:
        if claim is not None:  # released after the folder is gone or in place, never while a sweep could see it
            claim.close()
        unlock_output(out)


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
            if entry.stat().st_uid != os.getuid() or _tool_marker(entry) is None:
                continue
        except OSError:
            continue
        candidates.append(entry)
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
        try:
            _remove_marker_last(folder)
        except OSError:
            shutil.rmtree(folder, ignore_errors=True)
        if claim is not None:  # released last, so a sweep never sees a live folder unlocked
            claim.close()
