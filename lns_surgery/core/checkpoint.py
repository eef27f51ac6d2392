"""Checkpoint folders on disk: finding them, reading their config and weights, and copying them.

Nothing here loads a model. Weight files are checked from their safetensors headers and tensors are
read one at a time, so reading a 100 GB checkpoint needs no more memory than a 100 MB one; files are
copied with the filesystem's fastest safe route, and only regular files inside the folder are read.
Copied weight files are checked against the headers read before the copy (``check_copied_weights``).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import shutil
import stat
import struct
from dataclasses import dataclass
from pathlib import Path

from lns_surgery.core import outputs
from lns_surgery.core.errors import LNSError, first_line
from lns_surgery.core.lns_status import config_num_layers, lns_record_problem  # noqa: F401  (re-exported)

SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"
_FICLONE = 0x40049409  # ioctl number of Linux's copy-on-write clone (btrfs, XFS, bcachefs)


# --- finding the source -------------------------------------------------------------------------


_HUB_SNAPSHOT = re.compile(r"/models--([^/]+)/snapshots/([^/]+)$")


def source_record(source: str | os.PathLike | None, revision: str | None = None) -> dict:
    """What a converted checkpoint records about its source (``lns.source``): something that may be
    published with it, never a path of this machine. A Hub id (and its revision; a folder of the local
    Hub cache counts as its repository and commit), a ``builtin:`` name, or for a local folder only its
    name, marked ``"local": True``, so that no one mistakes it for a Hub id."""
    from lns_surgery.core.sources import BUILTIN_PREFIX, builtin_name, is_hub_id

    if source is None or not str(source):
        return {"model": None, "revision": None}
    text = str(source)
    if text.startswith(BUILTIN_PREFIX):
        return {"model": text, "revision": None}
    builtin = builtin_name(text) if Path(text).expanduser().is_dir() else None
    if builtin is not None:  # a built-in model loaded from its folder (the demo converts in memory)
        return {"model": builtin, "revision": None}
    path = Path(text).expanduser()
    if path.exists() or not is_hub_id(text):
        real = path.resolve()
        snapshot = _HUB_SNAPSHOT.search(real.as_posix())
        if snapshot:  # models--OWNER--NAME: Hub ids cannot contain "--", so the split is unambiguous
            return {"model": snapshot.group(1).replace("--", "/"), "revision": snapshot.group(2)}
        return {"model": real.name or text, "revision": None, "local": True}
    return {"model": text, "revision": revision}


def resolve_source(source: str | os.PathLike, revision: str | None = None) -> tuple[Path, dict]:
    """A local folder for ``source`` (a folder, or a Hub id fetched with huggingface_hub) and its
    provenance (``source_record``)."""
    from lns_surgery.core.sources import BUILTIN_PREFIX, is_hub_id, resolve_builtin

    if str(source).startswith(BUILTIN_PREFIX):
        return Path(resolve_builtin(str(source))), source_record(source)
    path = Path(source).expanduser()
    if path.is_dir():
        return path, source_record(path)
    if path.exists():
        raise LNSError(f"'{source}' is a file; give the checkpoint's folder")
    text = str(source)
    if not is_hub_id(text):
        raise LNSError(f"no such checkpoint folder: '{source}'")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled

    try:
        folder = snapshot_download(repo_id=text, revision=revision)
    except (LocalEntryNotFoundError, OfflineModeIsEnabled) as exc:
        raise LNSError(f"'{source}' is not a local folder and could not be fetched from the Hub (offline?): {first_line(exc)}") from None
    except (HfHubHTTPError, ValueError, OSError) as exc:
        raise LNSError(f"could not fetch '{source}' from the Hub: {first_line(exc)}") from None
    return Path(folder), source_record(text, revision or "main")


# --- the config ---------------------------------------------------------------------------------


def read_config(folder: Path) -> dict:
    path = folder / "config.json"
    if not path.is_file():
        raise LNSError(f"'{folder}' has no config.json: not a Hugging Face model folder")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise LNSError(f"'{path}' is not valid JSON: {exc}") from None
    if not isinstance(config, dict):
        raise LNSError(f"'{path}' holds a JSON {type(config).__name__}, not an object of settings: not a model config")
    if "model_type" not in config:
        raise LNSError(f"'{path}' has no model_type")
    problem = lns_record_problem(config)
    if problem:
        raise LNSError(f"'{path}': {problem}")
    return config


def write_json(path: Path, document: dict) -> None:
    """``document`` as a checkpoint's JSON files are written: indented, keys sorted, a final newline."""
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(document, handle, indent=2, sort_keys=True)
        handle.write("\n")


# --- weights ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorEntry:
    file: Path
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute byte offsets in the file
    end: int
    file_size: int = -1  # the file's size when its header was read (-1: not known)


def read_safetensors_header(path: Path) -> dict[str, TensorEntry]:
    """The tensors of a safetensors file, from its header only; raises LNSError if the file is damaged."""
    size = path.stat().st_size
    with open(path, "rb") as handle:
        raw_length = handle.read(8)
        if len(raw_length) < 8:
            raise LNSError(f"'{path.name}' is not a safetensors file (too short)")
        (header_length,) = struct.unpack("<Q", raw_length)
        if header_length > min(size - 8, 100_000_000):
            raise LNSError(f"'{path.name}' is truncated or not a safetensors file")
        try:
            header = json.loads(handle.read(header_length))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise LNSError(f"'{path.name}' has a damaged header") from None
    data_start = 8 + header_length
    if not isinstance(header, dict):
        raise LNSError(f"'{path.name}' has a damaged header (not a JSON object)")
    entries = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if not _header_entry_ok(info):
            raise LNSError(f"'{path.name}' has a damaged header entry for '{name}'")
        begin, end = info["data_offsets"]
        entries[name] = TensorEntry(path, info["dtype"], tuple(info["shape"]), data_start + begin, data_start + end, size)
    expected = max((entry.end for entry in entries.values()), default=data_start)
    if size < expected:
        raise LNSError(f"'{path.name}' is truncated: {size} bytes, its header needs {expected}")
    _check_with_safetensors(path)
    return entries


def _header_entry_ok(info) -> bool:
    if not isinstance(info, dict) or not isinstance(info.get("dtype"), str):
        return False
    shape, offsets = info.get("shape"), info.get("data_offsets")
    integers = lambda values: isinstance(values, list) and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0
                                                               for v in values)
    return integers(shape) and integers(offsets) and len(offsets) == 2


def _check_with_safetensors(path: Path) -> None:
    """safetensors' own checks of the header: offsets that match each tensor's shape and dtype, contiguous
    and without overlap, covering the file. Memory-maps the file; reads no tensor data."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt"):
            pass
    except Exception as exc:  # SafetensorError, or an OSError from the mapping
        raise LNSError(f"'{path.name}' is damaged: {first_line(exc)}") from None


def weight_map(folder: Path) -> dict[str, TensorEntry] | None:
    """Every tensor of a safetensors checkpoint (one file or an indexed set of shards), checked.

    Returns None for checkpoints stored only as PyTorch ``.bin`` files (they can be copied, not read).
    """
    index = folder / SAFETENSORS_INDEX
    if index.is_file():
        try:
            shard_of = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, KeyError):
            raise LNSError(f"'{index.name}' is damaged (no weight_map)") from None
        if not isinstance(shard_of, dict) or not all(isinstance(v, str) for v in shard_of.values()):
            raise LNSError(f"'{index.name}' is damaged (its weight_map is not a mapping of tensor names to files)")
        shards = sorted(set(shard_of.values()))
        outside = [shard for shard in shards if Path(shard).name != shard or shard in (".", "..")]
        if outside:  # the copy and an upload take the folder's own files only: such a shard would be lost
            raise LNSError(f"{index.name} names shard '{outside[0]}', which is not a file in the checkpoint's folder")
        missing = [shard for shard in shards if not (folder / shard).is_file()]
        if missing:
            raise LNSError(f"shard '{missing[0]}' named in {index.name} is missing from '{folder}'")
        tensors = {}
        for shard in shards:
            tensors.update(read_safetensors_header(folder / shard))
        absent = [name for name, shard in shard_of.items() if name not in tensors]
        if absent:
            raise LNSError(f"tensor '{absent[0]}' named in {index.name} is not in its shard")
        return tensors
    single = folder / "model.safetensors"
    if single.is_file():
        return read_safetensors_header(single)
    if (folder / "pytorch_model.bin").is_file() or (folder / BIN_INDEX).is_file():
        return None
    raise LNSError(f"'{folder}' has no weights (model.safetensors, an index, or pytorch_model.bin)")


_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}


def torch_dtype(entry: TensorEntry):
    """The torch dtype of a floating-point tensor; LNSError for any other (it cannot be rescaled)."""
    import torch

    if entry.dtype not in _DTYPES:
        raise LNSError(f"cannot rescale a {entry.dtype} tensor in '{entry.file.name}'")
    return getattr(torch, _DTYPES[entry.dtype])


def read_tensor(entry: TensorEntry):
    import torch

    dtype = torch_dtype(entry)
    with open(entry.file, "rb") as handle:
        handle.seek(entry.start)
        raw = bytearray(handle.read(entry.end - entry.start))
    return torch.frombuffer(raw, dtype=dtype).reshape(entry.shape).clone()


# --- copying ------------------------------------------------------------------------------------


def check_copied_weights(tensors: dict[str, TensorEntry] | None, target: Path) -> None:
    """Each weight file copied into ``target`` has the size and the safetensors header its source had
    when ``weight_map`` read it. A shard that another program truncated or rewrote during the copy
    would otherwise become a checkpoint that loads wrong or not at all, with nothing said."""
    by_file: dict[str, dict[str, TensorEntry]] = {}
    for name, entry in (tensors or {}).items():
        by_file.setdefault(entry.file.name, {})[name] = entry
    for file_name, entries in sorted(by_file.items()):
        copy = target / file_name
        expected = next(iter(entries.values())).file_size
        changed = f"'{file_name}' changed while it was being copied (is another program writing the checkpoint?)"
        size = copy.stat().st_size if copy.is_file() else -1
        if expected >= 0 and size != expected:
            raise LNSError(f"{changed}: it had {expected} bytes, the copy has {size}")
        try:
            copied = read_safetensors_header(copy)
        except LNSError as exc:
            raise LNSError(f"{changed}: {exc}") from None
        layout = lambda found: {key: (e.dtype, e.shape, e.start, e.end) for key, e in found.items()}  # noqa: E731
        if layout(copied) != layout(entries):
            raise LNSError(f"{changed}: its tensors are not the ones its header listed before the copy")


def copy_file(source: Path, target: Path, link: str = "auto") -> str:
    """Copy one file the fastest safe way; returns how ("reflink", "hardlink" or "copy").

    ``auto`` uses a copy-on-write clone where the filesystem has one, else a kernel-side copy into the
    same open file (re-opening it with truncation would make ext4 flush it on close). Hard links are
    faster still but share the source's bytes: anything that later rewrites the output in place
    would change the original too, so they are used only when asked for.
    """
    if link == "hardlink":
        try:
            os.link(source, target)
            return "hardlink"
        except OSError:
            pass
    with open(source, "rb") as src, open(target, "wb") as dst:
        if link in ("auto", "hardlink"):
            try:
                fcntl.ioctl(dst.fileno(), _FICLONE, src.fileno())
                return "reflink"
            except OSError as exc:
                if exc.errno not in (errno.EOPNOTSUPP, errno.EXDEV, errno.EINVAL, errno.ENOTTY, errno.EPERM):
                    raise
        _kernel_copy(src, dst)
    return "copy"


def _kernel_copy(src, dst) -> None:
    """copy_file_range (the kernel moves the bytes, like cp), else a buffered copy."""
    remaining = os.fstat(src.fileno()).st_size
    try:
        while remaining > 0:
            copied = os.copy_file_range(src.fileno(), dst.fileno(), remaining)
            if copied == 0:
                break
            remaining -= copied
        return
    except (AttributeError, OSError) as exc:  # no copy_file_range here, or not between these files
        if isinstance(exc, OSError) and exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EPERM):
            raise
    src.seek(0)
    dst.seek(0)
    dst.truncate()
    shutil.copyfileobj(src, dst, 16 * 1024 * 1024)


# Version control, download caches and the input's own output marker are not part of the checkpoint.
_NOT_COPIED = {".git", ".cache", outputs.MARKER_NAME}


def _kind_of(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "a named pipe (FIFO)"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device")):
        if test(mode):
            return name
    return "not a regular file"


def check_readable_file(path: Path, roots: list[Path]) -> None:
    """Refuse ``path`` unless it is a regular file, or a symbolic link to one inside ``roots``.

    A named pipe would block a copy forever, a device could be endless, and a link out of the folder
    would read (and publish) a file that is not part of it.
    """
    if path.is_symlink():
        try:
            target = path.resolve()
        except (RuntimeError, OSError):  # Python 3.11 raises RuntimeError for a loop, later versions OSError
            raise LNSError(f"'{path}' is a symbolic link that never reaches a file (a loop); remove it") from None
        if not any(target == root or root in target.parents for root in roots):
            raise LNSError(f"'{path}' is a symbolic link to '{target}', outside the folder; "
                           "copy the file into the folder instead")
        mode = target.stat().st_mode if target.exists() else 0
    else:
        mode = path.lstat().st_mode
    if not stat.S_ISREG(mode):
        what = "a broken symbolic link" if mode == 0 else _kind_of(mode)
        raise LNSError(f"'{path}' is {what}; only regular files are read from a model folder: remove it")


def link_roots(folder: Path) -> list[Path]:
    """Where symbolic links in ``folder`` may point: inside it, and for a Hugging Face cache snapshot
    (``.../snapshots/REV``), into the same repository's ``blobs`` folder, which its links point at."""
    real = folder.resolve()
    roots = [real]
    if real.parent.name == "snapshots":
        roots.append(real.parent.parent / "blobs")
    return roots


def folder_files(folder: Path, skip_top: set[str] = frozenset(_NOT_COPIED)) -> list[Path]:
    """Every file of ``folder`` (relative paths, sorted), each checked by ``check_readable_file``.

    A linked folder is refused, so no cycle can form and nothing outside is walked.
    """
    folder = Path(folder)
    roots = link_roots(folder)
    files = []
    for root, directories, names in os.walk(folder):
        base = Path(root)
        if base == folder:
            directories[:] = [name for name in directories if name not in skip_top]
            names = [name for name in names if name not in skip_top]
        for name in sorted(directories):
            if (base / name).is_symlink():
                raise LNSError(f"'{base / name}' is a symbolic link to a folder; only regular files are read "
                               "from a model folder: replace it with the folder itself")
        for name in sorted(names):
            check_readable_file(base / name, roots)
            files.append((base / name).relative_to(folder))
    return sorted(files)


def copy_folder(source: Path, target: Path, skip: set[str] = frozenset(), link: str = "auto") -> None:
    """Copy every file of ``source`` into ``target`` (keeping sub-folders) except the names in ``skip``.

    The whole folder is checked (``folder_files``) before the first byte is copied.
    """
    for relative in folder_files(source):
        if str(relative) in skip:
            continue
        destination = target / relative
        destination.parent.mkdir(parents=True, exist_ok=True)
        copy_file((source / relative).resolve(), destination, link)
