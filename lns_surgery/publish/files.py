"""Which files of a checkpoint folder go to the Hub, and a view of exactly those files.

A training output folder holds more than the model: optimizer and scheduler states, RNG states,
intermediate ``checkpoint-*`` folders, TensorBoard ``runs/``, caches. None of that is needed to load
the model, some of it is large, and ``training_args.bin`` is a pickle that can carry credentials, so
it stays home. Everything is decided here, once: the dry run lists, the validation loads and the
upload sends the same set.
"""

from __future__ import annotations

import contextlib
import fnmatch
import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from lns_surgery.core.checkpoint import check_readable_file, link_roots
from lns_surgery.core.errors import LNSError
from lns_surgery.core.outputs import scratch_dir

# (pattern on a path component, why it stays out). Folder rules exclude everything below them.
EXCLUDED_FOLDERS = (
    ("checkpoint-*", "intermediate checkpoint"),
    ("checkpoints", "intermediate checkpoint"),  # where `lns-surgery pretrain/sft` moves them at the end
    ("global_step*", "DeepSpeed optimizer shards"),
    ("runs", "TensorBoard logs"),
    ("wandb", "experiment-tracker logs"),
    ("__pycache__", "Python cache"),
    (".*", "hidden folder (VCS, caches, temporary output)"),
)
EXCLUDED_FILES = (
    ("optimizer.pt", "optimizer state"),
    ("optimizer.bin", "optimizer state"),
    ("optimizer_*", "optimizer state"),
    ("*optim_states.pt", "optimizer state"),
    ("scheduler.pt", "learning-rate scheduler state"),
    ("scaler.pt", "mixed-precision scaler state"),
    ("rng_state*.pth", "random-number-generator state"),
    ("training_args.bin", "pickled training arguments: may hold credentials, not needed to load"),
    ("*.pyc", "Python cache"),
    (".gitattributes", None),  # kept: the Hub reads it
    # Hidden already, but named, since huggingface_hub's own upload would send them: the marker lists
    # the process id and host name of the run that wrote the folder.
    (".lns-*", "lns-surgery's own bookkeeping (the output marker)"),
    ("*.lns-lock", "lns-surgery's lock file"),
    ("*.lns-tmp-*", "a temporary file of an lns-surgery run"),
    (".*", "hidden file"),
)


@dataclass(frozen=True)
class UploadFile:
    path: str  # POSIX path relative to the folder: the path in the repository
    size: int


@dataclass(frozen=True)
class Selection:
    folder: Path
    files: tuple[UploadFile, ...]
    excluded: tuple[tuple[str, str], ...]  # (path, reason)

    @property
    def total_bytes(self) -> int:
        return sum(item.size for item in self.files)

    def paths(self) -> list[str]:
        return [item.path for item in self.files]


def publish_error(folder: Path, reason: str) -> LNSError:
    """The one error every refusal to publish ``folder`` raises."""
    return LNSError(f"cannot publish '{folder}': {reason}")


def _excluded_folder(relative: str) -> bool:
    """Whether nothing below the folder ``relative`` is uploaded."""
    return any(fnmatch.fnmatchcase(part, pattern) for part in PurePosixPath(relative).parts
               for pattern, _ in EXCLUDED_FOLDERS)


def exclusion_reason(relative: str) -> str | None:
    """Why ``relative`` (a POSIX path inside the folder) is not uploaded, or None when it is."""
    parts = PurePosixPath(relative).parts
    for folder in parts[:-1]:
        for pattern, reason in EXCLUDED_FOLDERS:
            if fnmatch.fnmatchcase(folder, pattern):
                return reason
    for pattern, reason in EXCLUDED_FILES:
        if fnmatch.fnmatchcase(parts[-1], pattern):
            return reason
    return None


def select_files(folder: str | os.PathLike) -> Selection:
    """The files of ``folder`` that would be uploaded (sorted) and those left out, with the reason.

    Raises LNSError for a file that would go up but is not a regular file, or is a symbolic link out
    of the folder (a file or folder outside would be published with it).
    """
    folder = Path(folder)
    roots = link_roots(folder)
    included, excluded = [], []
    for root, directories, names in os.walk(folder):
        directories.sort()
        base = Path(root)
        for name in directories:
            relative = (base / name).relative_to(folder).as_posix()
            if (base / name).is_symlink() and not _excluded_folder(relative):
                raise publish_error(folder, f"'{relative}' is a symbolic link to a folder; only regular files are uploaded")
        for name in sorted(names):
            path = base / name
            relative = path.relative_to(folder).as_posix()
            reason = exclusion_reason(relative)
            if reason is not None:
                excluded.append((relative, reason))
                continue
            try:
                check_readable_file(path, roots)
            except LNSError as exc:
                raise publish_error(folder, str(exc)) from None
            included.append(UploadFile(relative, path.stat().st_size))
    included.sort(key=lambda item: item.path)
    excluded.sort()
    return Selection(folder, tuple(included), tuple(excluded))


@contextlib.contextmanager
def staged_view(selection: Selection, replacements: dict[str, str] | None = None):
    """A temporary folder holding exactly the selected files (symbolic links to the originals), with
    ``replacements`` (path -> text, e.g. the rendered README.md) written as real files.

    Loading and uploading from this view proves that what goes up is what was checked. It lives in a
    scratch folder of its own, which the next push removes should this process be killed.
    """
    replacements = dict(replacements or {})
    with scratch_dir("publish") as scratch:
        view = scratch / "view"  # beside the scratch folder's marker, which must not go up
        view.mkdir()
        for item in selection.files:
            if item.path in replacements:
                continue
            target = view / item.path
            target.parent.mkdir(parents=True, exist_ok=True)
            os.symlink((selection.folder / item.path).resolve(), target)
        for path, text in replacements.items():
            target = view / path
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(text, encoding="utf-8")
        yield view


def view_selection(view: Path, selection: Selection, replacements: dict[str, str]) -> Selection:
    """``selection`` as seen in the staged view: replaced files get their new size, new ones are added."""
    sizes = {item.path: item.size for item in selection.files}
    for path in replacements:
        sizes[path] = (view / path).stat().st_size
    files = tuple(UploadFile(path, size) for path, size in sorted(sizes.items()))
    return Selection(selection.folder, files, selection.excluded)


def human_size(size: int) -> str:
    value = float(size)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if value < 1000 or unit == "TB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{size} B"
