"""Converting checkpoints on disk: ``convert`` (code or fold mode), ``fold`` and ``inspect``.

The model is never instantiated with real weights. Code mode copies the weight files untouched and
writes a new config plus the LNS code; fold mode copies them and rewrites only the norm tensors.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from lns_surgery.conversion.registry import Architecture, lookup, primary_auto_class
from lns_surgery.core import checkpoint, outputs
from lns_surgery.core.errors import LNSError, first_line
from lns_surgery.core.lns_status import LNSStatus, lns_status
from lns_surgery.modeling import lns_layers

logger = logging.getLogger(__name__)

MODES = ("code", "fold")


def _load_config_object(folder: Path, config_dict: dict, trust_remote_code: bool):
    from transformers import AutoConfig, CONFIG_MAPPING

    custom = config_dict["model_type"] not in CONFIG_MAPPING
    if custom and not config_dict.get("auto_map"):
        raise LNSError(f"transformers does not know model_type '{config_dict['model_type']}' and the folder has no custom code")
    if custom and not trust_remote_code:
        raise LNSError(
            f"'{config_dict['model_type']}' is defined by code inside the checkpoint; "
            "pass --trust-remote-code to run it (read it first)"
        )
    try:
        return AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except Exception as exc:  # a malformed field, or the config class's own code failing on it
        raise LNSError(f"could not read the model config in '{folder}': {first_line(exc)}") from None


def build_on_meta(config, trust_remote_code: bool = False):
    """The stock model for ``config`` on the meta device: its module tree, no weights, no memory.

    The class the checkpoint names (``architectures``) where it is a causal-LM or image-text class of
    this family, so a multimodal checkpoint is built with its vision tower; else the causal LM, else
    the image-text-to-text model (Mistral 3, LLaVA, ...).
    """
    import torch
    import transformers

    model_class = generative_class(config)
    try:
        with torch.device("meta"):
            if model_class is not None:
                return model_class._from_config(config)
            return transformers.AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    except Exception as exc:  # any failure of a model's own constructor
        raise LNSError(f"could not build '{config.model_type}' to inspect it: {first_line(exc)}") from None


def generative_class(config):
    """The transformers class to build for a stock config, or None for custom code."""
    import transformers

    from lns_surgery.conversion.registry import classes_for_type

    classes = classes_for_type(config.model_type)
    causal, image_text = classes.get("AutoModelForCausalLM"), classes.get("AutoModelForImageTextToText")
    named = (getattr(config, "architectures", None) or [None])[0]
    for name in (named if named in (causal, image_text) else None, causal, image_text):
        if name and hasattr(transformers, name):
            return getattr(transformers, name)
    return None


def architecture_for_checkpoint(
    folder: Path,
    config_dict: dict,
    trust_remote_code: bool = False,
    layers: str | None = None,
    norms: list[str] | None = None,
    force: bool = False,
):
    """(Architecture, transformers config, stock model on the meta device) for a stock checkpoint.

    The layout is what the model's data flow shows, checked against the registry where the family is
    in it (see ``architecture_for_model``); the norm form and the fold rule are proven on the model's
    own norm classes.
    """
    from lns_surgery.conversion.apply import architecture_for_model

    config = _load_config_object(folder, config_dict, trust_remote_code)
    lookup(config_dict["model_type"])  # refuses known post-norm families before anything is built
    if any("--" in name for name in (getattr(config, "auto_map", None) or {}).values()):
        raise LNSError("the checkpoint's custom code lives in another repository; download it beside the weights first")
    model = build_on_meta(config, trust_remote_code)
    return architecture_for_model(model, layers, norms, force), config, model


@dataclasses.dataclass(frozen=True)
class Plan:
    """What a conversion of one checkpoint needs to know about its model."""

    arch: Architecture
    num_layers: int
    # Per block, (parameter name, file key) of each scaled norm parameter, for fold mode; None when not
    # asked for, and ``fold_error`` when the norms cannot be folded (the refusal, in one line).
    fold_tensors: list[list[tuple[str, str]]] | None = None
    fold_error: str | None = None


def conversion_plan(
    folder: Path,
    config_dict: dict,
    tensors: dict | None,
    trust_remote_code: bool = False,
    layers: str | None = None,
    norms: list[str] | None = None,
    for_fold: bool = False,
    force: bool = False,
) -> Plan:
    """Where LNS acts in this checkpoint, how many blocks it has and, for fold mode, which file tensors
    hold the scaled norms: by building the model on the meta device, tracing it and proving its norms.

    Every conversion plans afresh. A cache of plans saved about a second of start-up but could be
    edited, replaced or outlived by the code it described, and a wrong plan is a wrong model.
    """
    lookup(config_dict["model_type"])  # refuses known post-norm families before anything is built
    arch, _, model = architecture_for_checkpoint(folder, config_dict, trust_remote_code, layers, norms, force)
    check_layer_count(model, arch.layers, tensors)
    plan = Plan(arch, len(lns_layers.resolve_layers(model, arch.layers)))
    if for_fold and tensors is not None and arch.fold_rule:
        try:
            plan = dataclasses.replace(plan, fold_tensors=norm_tensors(model, arch.lns_block(), tensors))
        except LNSError as exc:
            plan = dataclasses.replace(plan, fold_error=str(exc))
    return plan


def _refuse_converted(config_dict: dict) -> None:
    status = lns_status(config_dict)
    if status.kind == "lns":
        raise LNSError(
            f"the input is already an LNS checkpoint (model_type {config_dict['model_type']}, "
            f"alpha {status.alpha}): converting it again would scale twice"
        )
    if status.kind == "lns-folded":
        raise LNSError("the input already has LayerNorm Scaling folded into its weights: converting it again would scale twice")


def norm_tensors(model, lns: dict, tensors: dict) -> list[list[tuple[str, str]]]:
    """Per block, ``(parameter name, file key)`` of every parameter of the scaled norms.

    File keys come from transformers' own loading renames, so fold mode rewrites exactly the tensors
    the norms load from; a parameter no file key loads into is refused rather than skipped.
    """
    from lns_surgery.core.tensor_names import file_keys_by_module_key

    file_keys = file_keys_by_module_key(model, tensors)
    blocks = lns_layers.resolve_layers(model, lns["layers"])
    prefix = _module_path(model, blocks)
    names_of: dict[int, list[str]] = {}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        names_of.setdefault(id(parameter), []).append(name)
    per_block = []
    for index, block in enumerate(blocks):
        entries = []
        for norm in lns["norms"]:
            for name, parameter in block.get_submodule(norm).named_parameters(recurse=False):
                module_key = f"{prefix}.{index}.{norm}.{name}"
                shared = [other for other in names_of[id(parameter)] if other != module_key]
                if shared:  # a tied weight: folding would rescale the other module too
                    raise LNSError(f"'{module_key}' is the same weight as '{shared[0]}', so it cannot be folded; use --mode code")
                if module_key not in file_keys:
                    raise LNSError(f"no tensor in the weight files loads into '{module_key}', so it cannot be folded")
                entries.append((name, file_keys[module_key]))
        per_block.append(entries)
    return per_block


def _module_path(model, target) -> str:
    return next(name for name, module in model.named_modules() if module is target)


def check_layer_count(model, layers: str, tensors: dict | None) -> None:
    """Refuse a config whose block count is not the weights' (the distinct block indices under the
    block list's name in the weight files): converted, it would scale the wrong blocks, drop some or
    leave some to random initialisation. Keys the model's class ignores on loading (the multi-token
    prediction layer that DeepSeek-V3 files keep after the last block) are not counted."""
    import re

    from lns_surgery.core.tensor_names import file_keys_by_module_key

    if not tensors:
        return
    blocks = lns_layers.resolve_layers(model, layers)
    prefix = _module_path(model, blocks)
    ignored = [re.compile(pattern) for pattern in (getattr(model, "_keys_to_ignore_on_load_unexpected", None) or ())]
    keys = [key for key in tensors if not any(pattern.search(key) for pattern in ignored)]
    # Where the block list lives in the files' names: the part before the block index in the file key
    # of each block parameter (renames can change the rest of the key, never the index).
    candidates: dict[str, int] = {}
    for module_key, file_key in file_keys_by_module_key(model, keys).items():
        if not module_key.startswith(prefix + "."):
            continue
        index, _, rest = module_key[len(prefix) + 1:].partition(".")
        if index.isdigit() and rest:
            parts = file_key.split(".")
            if index in parts:
                file_prefix = ".".join(parts[:parts.index(index)])
                candidates[file_prefix] = candidates.get(file_prefix, 0) + 1
    if not candidates:
        return
    file_prefix = max(candidates, key=candidates.get)
    depth = len(file_prefix.split(".")) if file_prefix else 0
    in_files = set()
    for key in keys:
        parts = key.split(".")
        if ".".join(parts[:depth]) == file_prefix and len(parts) > depth + 1 and parts[depth].isdigit():
            in_files.add(int(parts[depth]))
    with_weights = set()
    for name, _ in model.named_parameters():  # shared parameters are named once, by their first owner
        index = name[len(prefix) + 1:].partition(".")[0] if name.startswith(prefix + ".") else ""
        if index.isdigit():
            with_weights.add(int(index))
    where = f"under '{file_prefix}'" if file_prefix else "at the top level"
    extra = sorted(in_files - set(range(len(blocks))))
    if extra:
        raise LNSError(f"config.json says the model has {len(blocks)} blocks, but the weight files hold block {extra[0]} "
                       f"{where} too ({len(in_files)} blocks in all): the config does not describe these weights")
    missing = sorted(with_weights - in_files)
    if missing:
        raise LNSError(f"config.json says the model has {len(blocks)} blocks, but the weight files hold no tensor of block "
                       f"{missing[0]} {where}: the config does not describe these weights")


def _fold_scales_into_weights(out: Path, lns: dict, scales: list[float], tensors: dict, per_block) -> None:
    """Rewrite the norm tensors of the copied shards in ``out`` so stock classes compute LNS."""
    from lns_surgery.conversion.norm_math import fold_tensor

    rule = lns.get("fold_rule")
    for scale, entries in zip(scales, per_block):
        for parameter_name, key in entries:
            entry = tensors[key]
            folded = fold_tensor(rule, parameter_name, checkpoint.read_tensor(entry), scale)
            _write_tensor_in_place(out / entry.file.name, entry, folded)


def _write_tensor_in_place(file: Path, entry: checkpoint.TensorEntry, tensor) -> None:
    """Overwrite one tensor's bytes in ``file`` (a copy laid out like ``entry.file``)."""
    import torch

    data = tensor.to(checkpoint.torch_dtype(entry)).contiguous().view(torch.uint8).numpy().tobytes()
    if len(data) != entry.end - entry.start:
        raise AssertionError("rescaled tensor changed size")
    with open(file, "r+b") as handle:
        handle.seek(entry.start)
        handle.write(data)


def _check_foldable(lns: dict, tensors: dict | None) -> None:
    if tensors is None:
        raise LNSError("fold mode rewrites safetensors weights; this checkpoint has only .bin files (use --mode code)")
    if not lns.get("fold_rule"):
        classes = ", ".join(lns.get("norm_classes") or ()) or "these norms"
        raise LNSError(
            f"the scale cannot be folded exactly into the weights of {classes} (no parameters, or no "
            "weight rule reproduces its math); use --mode code"
        )


def _copy_for_rewrite(folder: Path, out: Path, tensors: dict | None, link: str, skip: set[str]) -> None:
    """Copy the folder; shards that will be patched are always real copies, never hard links. Every
    copied shard is checked against what was read of it before (``check_copied_weights``)."""
    patched = {entry.file.name for entry in (tensors or {}).values()}
    checkpoint.copy_folder(folder, out, skip=skip | patched, link=link)
    for name in sorted(patched):
        checkpoint.copy_file(folder / name, out / name, link="auto")
    checkpoint.check_copied_weights(tensors, out)


def _check_room(folder: Path, out: Path, link: str) -> None:
    """Refuse a destination without room for the copy before it starts. Where a clone or a hard link may
    share the input's bytes (the same filesystem, unless --link copy), what the copy takes cannot be
    known beforehand: a disk that fills up then stops the write with one line instead."""
    if link != "copy" and outputs.same_filesystem(folder, out):
        return
    outputs.check_room(out, sum((folder / relative).stat().st_size for relative in checkpoint.folder_files(folder)))


def convert(
    source: str | Path,
    out: str | Path,
    *,
    mode: str = "code",
    alpha: float = 1.0,
    overwrite: bool = False,
    trust_remote_code: bool = False,
    layers: str | None = None,
    norms: list[str] | None = None,
    revision: str | None = None,
    link: str = "auto",
    force: bool = False,
) -> Path:
    """Convert a stock checkpoint (folder or Hub id) to LayerNorm Scaling; returns the output folder.

    ``mode="code"`` keeps the weights byte for byte and writes an LNS config and its code, loadable
    with ``trust_remote_code=True``. ``mode="fold"`` writes a stock checkpoint whose norm weights
    carry the scales, for runtimes that cannot run custom code. ``norms`` that the model's data flow
    does not show as pre-sublayer norms are refused unless ``force``.
    """
    if mode not in MODES:
        raise LNSError(f"unknown mode '{mode}'; expected one of {', '.join(MODES)}")
    if not 0.0 <= alpha <= 1.0:
        raise LNSError("alpha must be between 0 and 1")
    out = Path(out)
    outputs.check_output(out, overwrite, [source])  # a local source is an input already: its message first
    folder, provenance = checkpoint.resolve_source(source, revision)
    outputs.check_output(out, overwrite, [folder])
    config_dict = checkpoint.read_config(folder)
    _refuse_converted(config_dict)
    tensors = checkpoint.weight_map(folder)
    plan = conversion_plan(folder, config_dict, tensors, trust_remote_code, layers, norms, for_fold=mode == "fold",
                           force=force)
    arch, num_layers = plan.arch, plan.num_layers
    lns = arch.lns_block(alpha, source=provenance)
    if mode == "fold":
        _check_foldable({**lns, "norm_classes": arch.norm_classes}, tensors)
        if plan.fold_error:
            raise LNSError(plan.fold_error)
        per_block = plan.fold_tensors

    _check_room(folder, out, link)
    with outputs.atomic_output_dir(out, overwrite) as staging:
        if mode == "code":
            checkpoint.copy_folder(folder, staging, skip={"config.json"}, link=link)
            checkpoint.check_copied_weights(tensors, staging)
            new_config = dict(config_dict)
            new_config["model_type"] = lns_layers.lns_model_type(arch.model_type)
            new_config["architectures"] = [lns_layers.lns_class_name(arch.primary_class)]
            new_config["lns"] = lns
            checkpoint.write_json(staging / "config.json", new_config)
            lns_layers.write_custom_code(staging, lns)
        else:
            _copy_for_rewrite(folder, staging, tensors, link, skip={"config.json"})
            scales = [lns_layers.layer_scale(index, alpha) for index in range(num_layers)]
            _fold_scales_into_weights(staging, lns, scales, tensors, per_block)
            new_config = dict(config_dict)
            new_config["lns_folded"] = _folded_provenance(lns, scales)
            checkpoint.write_json(staging / "config.json", new_config)
    logger.debug("wrote %s (%s mode, %d layers)", out, mode, num_layers)
    return out


def _folded_provenance(lns: dict, scales: list[float]) -> dict:
    keep = ("schema_version", "rule", "alpha", "base_model_type", "layers", "norms", "norm_kind", "fold_rule", "source",
            "tool_version")
    provenance = {key: lns[key] for key in keep if key in lns}
    provenance["scales"] = scales
    return provenance


def fold(source: str | Path, out: str | Path, *, overwrite: bool = False, link: str = "auto") -> Path:
    """Turn an LNS code-mode checkpoint into a stock one whose norm weights carry the scales.

    Nothing about the folding is taken from the record but what the code-mode model computes (which
    blocks, which norms, which alpha): the fold rule is proven again on the base model's own norm
    classes, and a record that names another rule is refused; the block count must be the weights'.
    """
    from lns_surgery.conversion.detect import prove_norms

    out = Path(out)
    outputs.check_output(out, overwrite, [source])  # a local source is an input already: its message first
    folder, _ = checkpoint.resolve_source(source)
    outputs.check_output(out, overwrite, [folder])
    config_dict = checkpoint.read_config(folder)
    status = lns_status(config_dict)
    if status.kind == "lns-folded":
        raise LNSError("the input is already folded")
    if status.kind != "lns":
        raise LNSError("the input is not an LNS checkpoint; use `convert --mode fold` for a stock model")
    lns = status.record
    tensors = checkpoint.weight_map(folder)
    if tensors is None:
        _check_foldable(lns, tensors)
    stock_config = {key: value for key, value in config_dict.items() if key not in {"lns", "auto_map"}}
    stock_config["model_type"] = lns["base_model_type"]
    primary = primary_auto_class(lns["base_classes"])
    if primary is None or not isinstance(lns["base_classes"][primary], str):
        raise LNSError("'lns.base_classes' names no causal-LM or image-text class of the base model")
    stock_config["architectures"] = [lns["base_classes"][primary].rsplit(".", 1)[-1]]
    if any("." in str(name) for name in lns["base_classes"].values()):
        stock_config["auto_map"] = {auto: name for auto, name in _base_auto_map(lns).items()}
    model = build_on_meta(_stock_config_object(lns, stock_config, folder))
    try:
        recorded_layout = Architecture(lns["base_model_type"], lns["layers"], tuple(lns["norms"]), "",
                                       dict(lns["base_classes"]))
    except ValueError as exc:
        raise LNSError(f"'{folder / 'config.json'}': the 'lns' record is not a layout: {first_line(exc)}") from None
    proven = prove_norms(recorded_layout, model)
    recorded = lns.get("fold_rule", _LEGACY_FOLD_RULES.get(lns.get("norm_kind")))
    if recorded is not None and proven.fold_rule is not None and recorded != proven.fold_rule:
        raise LNSError(
            f"the checkpoint's record says the scale folds into {', '.join(proven.norm_classes)} by the rule "
            f"'{recorded}', but that class's own math needs '{proven.fold_rule}': the record was edited or written "
            "by another tool, and folding by it would write wrong weights"
        )
    lns = {**lns, "fold_rule": proven.fold_rule}
    _check_foldable({**lns, "norm_classes": proven.norm_classes}, tensors)
    check_layer_count(model, lns["layers"], tensors)
    per_block = norm_tensors(model, lns, tensors)
    scales = status.scales(len(per_block))
    stock_config["lns_folded"] = _folded_provenance(lns, scales)
    _check_room(folder, out, link)
    with outputs.atomic_output_dir(out, overwrite) as staging:
        _copy_for_rewrite(folder, staging, tensors, link, skip={"config.json", *lns_layers.CODE_FILES})
        _fold_scales_into_weights(staging, lns, scales, tensors, per_block)
        checkpoint.write_json(staging / "config.json", stock_config)
    return out


# Schema-1 checkpoints named no fold rule; their norm kinds imply it.
_LEGACY_FOLD_RULES = {"rmsnorm": "scale", "layernorm": "scale", "gemma_rmsnorm": "one_plus"}


def _stock_config_object(lns: dict, stock_config: dict, folder: Path):
    """The base family's own config class for a code-mode checkpoint's config (never the folder's code)."""
    from transformers import CONFIG_MAPPING

    if lns["base_model_type"] not in CONFIG_MAPPING:
        raise LNSError(
            f"the base model '{lns['base_model_type']}' is custom code; fold the original checkpoint with "
            "`convert --mode fold --trust-remote-code` instead"
        )
    try:
        return CONFIG_MAPPING[lns["base_model_type"]].from_dict(stock_config)
    except Exception as exc:  # a malformed field, as the config class's own checks see it
        raise LNSError(f"could not read the model config in '{folder}': {first_line(exc)}") from None


def _base_auto_map(lns: dict) -> dict:
    names = dict(lns["base_classes"])
    mapping = {"AutoConfig": names.pop("config")}
    mapping.update(names)
    return mapping


def inspect_checkpoint(
    source: str | Path,
    *,
    trust_remote_code: bool = False,
    layers: str | None = None,
    norms: list[str] | None = None,
    revision: str | None = None,
    force: bool = False,
) -> dict:
    """What LNS does (or did) to a checkpoint: status, layer path, norms, kind and the scale per layer."""
    folder, _ = checkpoint.resolve_source(source, revision)
    config_dict = checkpoint.read_config(folder)
    report = {"source": str(source), "model_type": config_dict["model_type"]}
    status = lns_status(config_dict)
    if status.kind == "stock":
        arch = conversion_plan(folder, config_dict, None, trust_remote_code, layers, norms, force=force).arch
        lns, origin = arch.lns_block(1.0), "detected" if arch.detected else "registry"
        shown = LNSStatus("lns", lns)  # what `convert` would apply
    else:
        lns, origin, shown = status.record, "checkpoint", status
    num_layers = checkpoint.config_num_layers(config_dict)
    if num_layers is None:
        raise LNSError("cannot tell how many layers the checkpoint has")
    report.update(
        status=status.kind,
        alpha=shown.alpha,
        architecture_from=origin,
        base_model_type=lns.get("base_model_type", config_dict["model_type"]),
        layers=lns["layers"],
        num_layers=num_layers,
        norms=list(lns["norms"]),
        norm_kind=lns["norm_kind"],
        fold_rule=lns.get("fold_rule", _LEGACY_FOLD_RULES.get(lns["norm_kind"])),
        scales=shown.scales(num_layers),
    )
    if status.kind == "stock":
        report["note"] = "scales shown are what `convert` would apply"
    return report
