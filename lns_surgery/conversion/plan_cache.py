"""A cache of conversion plans, so repeated conversions skip importing and tracing the family's code.

Deciding where LNS acts (the traced data flow, the norm math proven on the norm classes) needs the
family's transformers modelling code, whose import costs seconds (``modeling_utils`` pulls in
``torch._dynamo`` and ``torch.distributed.tensor``) while the rest of a code-mode conversion is a file
copy. The result depends only on inputs that can be named exactly, so it is stored under a digest of
all of them:

- the checkpoint's ``config.json`` and the names of the tensors in its weight files;
- ``--layers`` / ``--norms`` / ``--force``;
- the installed torch and transformers versions and the bytes of the family's modelling file (an
  edited or development install of transformers changes the key too);
- the bytes of this package's conversion, core and modelling code, registry included.

Anything else (a checkpoint with custom code, where the code files would have to be part of the key
and run anyway) is never cached. Refusals are not cached: they are recomputed. A damaged or
unreadable entry counts as a miss. Plans live in ``plans/`` of the package's cache folder
(``$LNS_SURGERY_CACHE``, else ``~/.cache/lns_surgery``); ``LNS_SURGERY_PLAN_CACHE=off`` turns it off.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.util
import json
import os
import tempfile
from pathlib import Path

from lns_surgery.conversion.registry import Architecture

FORMAT = 1
# Package folders whose code decides a plan (core: which file tensors hold the norms, for fold mode).
_TOOL_SOURCES = ("conversion", "core", "modeling")


@dataclasses.dataclass(frozen=True)
class Plan:
    """What a conversion of one checkpoint needs to know about its model, without building it."""

    arch: Architecture
    num_layers: int
    # Per block, (parameter name, file key) of each scaled norm parameter, for fold mode; None when not
    # computed yet, and ``fold_error`` when the norms cannot be folded (the refusal, in one line).
    fold_tensors: list[list[tuple[str, str]]] | None = None
    fold_error: str | None = None


def cache_folder() -> Path | None:
    if os.environ.get("LNS_SURGERY_PLAN_CACHE", "").lower() in ("off", "0", "false", "no"):
        return None
    from lns_surgery.core.sources import cache_dir

    return cache_dir() / "plans"


def plan_key(config_dict: dict, tensor_names, layers: str | None, norms: list[str] | None,
             force: bool = False) -> str | None:
    """The digest a plan is stored under, or None where plans are not cached."""
    if cache_folder() is None or config_dict.get("auto_map"):
        return None
    modelling_file = _modelling_file(config_dict["model_type"])
    if modelling_file is None:
        return None
    import torch
    import transformers

    parts = {
        "format": FORMAT,
        "config": config_dict,
        "tensors": sorted(tensor_names or ()),
        "layers": layers,
        "norms": list(norms) if norms is not None else None,
        "force": force,  # a forced plan must never answer an unforced conversion
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "modelling_file": _file_digest(modelling_file),
        "tool": _tool_digest(),
    }
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def load(key: str | None) -> Plan | None:
    if key is None:
        return None
    try:
        document = json.loads((cache_folder() / f"{key}.json").read_text(encoding="utf-8"))
        if document.get("format") != FORMAT:
            return None
        arch = document["arch"]
        arch = Architecture(**{**arch, "norms": tuple(arch["norms"]), "moe_norms": tuple(arch["moe_norms"]),
                               "norm_classes": tuple(arch["norm_classes"])})
        fold_tensors = document.get("fold_tensors")
        if fold_tensors is not None:
            fold_tensors = [[(name, key) for name, key in block] for block in fold_tensors]
        return Plan(arch, int(document["num_layers"]), fold_tensors, document.get("fold_error"))
    except (OSError, ValueError, KeyError, TypeError):  # absent or damaged: recompute
        return None


def store(key: str | None, plan: Plan) -> None:
    """Write the plan atomically; a cache that cannot be written only costs the next run time."""
    if key is None:
        return
    document = {"format": FORMAT, "arch": dataclasses.asdict(plan.arch), "num_layers": plan.num_layers,
                "fold_tensors": plan.fold_tensors, "fold_error": plan.fold_error}
    folder = cache_folder()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=folder, suffix=".tmp", delete=False, encoding="utf-8") as handle:
            json.dump(document, handle)
        os.replace(handle.name, folder / f"{key}.json")
    except OSError:
        pass


def _modelling_file(model_type: str) -> Path | None:
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES, model_type_to_module_name

    if model_type not in CONFIG_MAPPING_NAMES:
        return None
    module = model_type_to_module_name(model_type)
    try:
        spec = importlib.util.find_spec(f"transformers.models.{module}.modeling_{module}")
    except (ImportError, ValueError):
        return None
    return Path(spec.origin) if spec is not None and spec.origin else None


def _file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@functools.cache
def _tool_digest() -> str:
    package = Path(__file__).resolve().parent.parent
    digest = hashlib.sha256()
    for folder in _TOOL_SOURCES:
        for path in sorted((package / folder).iterdir()):
            if path.suffix in (".py", ".json"):
                digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()
