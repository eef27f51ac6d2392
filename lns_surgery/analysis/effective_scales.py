"""Did healing keep the surgery? The effective LNS scale of each scaled norm, against the source checkpoint.

On a pretrained model LNS is a reparametrisation: a norm whose weights learn ``w -> sqrt(l) * w``
computes exactly what the unscaled source norm did. So what a healed model applies is not its nominal
scale ``c_l`` but

    effective scale = || c_l * w_l || / || w_l(source) ||

with ``w`` the norm's effective weight (``w``, or ``1 + w`` for norms that compute ``(1 + w) * x_hat``).
It equals ``c_l`` right after conversion and 1 where training has undone the scaling. A folded
checkpoint carries ``c_l * w_l`` in its weights; a norm without weights keeps ``c_l`` whatever training
does. The source is a folder the user names (``--source``), or the one LNS checkpoints record where
this machine has it: a ``builtin:`` model or a Hub id in the local Hub cache. A local folder is
recorded by its name only (a published record must not say where it lay), so it needs ``--source``.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from lns_surgery.core.errors import LNSError
from lns_surgery.core.lns_status import lns_status

logger = logging.getLogger(__name__)


def _recorded_source(model) -> dict:
    record = (lns_status(model.config).record or {}).get("source")
    return record if isinstance(record, dict) else {}


def source_of(model) -> str | None:
    """The folder of the source checkpoint an LNS (or folded) model records, if this machine has it."""
    record = _recorded_source(model)
    source = record.get("model")
    if not isinstance(source, str) or not source or record.get("local"):
        return None
    from lns_surgery.core import checkpoint
    from lns_surgery.core.sources import BUILTIN_PREFIX, is_hub_id, resolve_builtin

    if source.startswith(BUILTIN_PREFIX):
        folder = Path(resolve_builtin(source))
    elif Path(source).expanduser().is_dir():  # a record of an older version: the path itself
        folder = Path(source).expanduser()
    elif is_hub_id(source):
        from huggingface_hub import snapshot_download

        try:
            folder = Path(snapshot_download(repo_id=source, revision=record.get("revision") or None,
                                            local_files_only=True))
            if checkpoint.weight_map(folder) is None:  # a cache that holds the config but not the weights
                return None
        except Exception:  # not in the cache, or only part of it
            return None
    else:
        return None
    return str(folder) if folder.is_dir() else None


def _unknown_source(model) -> None:
    """Say why a model's effective scales are missing from the report, and how to get them."""
    record = _recorded_source(model)
    source = record.get("model")
    if not isinstance(source, str) or not source:
        return  # built from a config: there is no source to compare with
    where = ("a local folder, recorded by its name only" if record.get("local")
             else "not on this machine or in its Hub cache")
    logger.warning("the effective LNS scales need the source checkpoint, which this model records as '%s' (%s): "
                   "give its folder with --source to measure them", source, where)


def _source_tensors(folder: str, model, wanted: list[str]) -> dict[str, torch.Tensor]:
    """The source checkpoint's tensors for the module parameter names ``wanted``, read from its files
    (transformers' own key renames applied, as when it loads them)."""
    from lns_surgery.core import checkpoint
    from lns_surgery.core.tensor_names import file_keys_by_module_key

    tensors = checkpoint.weight_map(Path(folder).expanduser())
    if tensors is None:
        raise LNSError(f"the source '{folder}' has no safetensors weights to compare the norms with")
    file_keys = file_keys_by_module_key(model, tensors)
    missing = [name for name in wanted if name not in file_keys]
    if missing:
        raise LNSError(f"the source '{folder}' has no tensor for '{missing[0]}': is it this model's source checkpoint?")
    return {name: checkpoint.read_tensor(tensors[file_keys[name]]).float() for name in wanted}


def effective_scales(model, source: str | None = None) -> dict | None:
    """Per block and scaled norm, the effective LNS scale against the source checkpoint.

    Returns ``{"source": folder, "norms": [...], "per_block": [[float | None per norm]], "nominal": [c_l]}``,
    or None for a stock model or an LNS model whose source is unknown (not recorded, not on this machine,
    and not given; a warning then says how to give it).
    """
    from lns_surgery.analysis.measures import unwrap
    from lns_surgery.modeling.lns_layers import resolve_layers

    model = unwrap(model)
    status = lns_status(model.config)
    lns, folded = status.record, status.kind == "lns-folded"
    if lns is None:
        return None
    source = source or source_of(model)
    if source is None:
        _unknown_source(model)
        return None
    rule = lns.get("fold_rule") or {"gemma_rmsnorm": "one_plus"}.get(lns.get("norm_kind"), "scale")
    blocks = resolve_layers(model, lns["layers"])
    prefix = next(name for name, module in model.named_modules() if module is blocks)
    nominal = status.scales(len(blocks))
    weights = {}
    for index, block in enumerate(blocks):
        for norm in lns["norms"]:
            weight = getattr(block.get_submodule(norm), "weight", None)
            if isinstance(weight, torch.Tensor):
                weights[f"{prefix}.{index}.{norm}.weight"] = weight.detach().float().cpu()
    originals = _source_tensors(source, model, list(weights))

    def effective(tensor):
        return 1.0 + tensor if rule == "one_plus" else tensor

    per_block = []
    for index in range(len(blocks)):
        row = []
        for norm in lns["norms"]:
            key = f"{prefix}.{index}.{norm}.weight"
            if key not in weights:  # no weights: nothing training can change
                row.append(nominal[index])
                continue
            if originals[key].shape != weights[key].shape:
                raise LNSError(f"the source '{source}' has '{key}' of shape {tuple(originals[key].shape)}, this model "
                               f"{tuple(weights[key].shape)}: it is not this model's source checkpoint")
            scale = 1.0 if folded else nominal[index]  # a folded weight already carries c_l
            reference = effective(originals[key]).norm().item()
            row.append(scale * effective(weights[key]).norm().item() / reference if reference > 0 else None)
        per_block.append(row)
    return {"source": str(source), "norms": list(lns["norms"]), "per_block": per_block, "nominal": nominal}
