"""Converting checkpoints on disk: ``convert`` (code or fold mode), ``fold`` and ``inspect``.

The model is never instantiated with real weights. Code mode copies the weight files untouched and
writes a new config plus the LNS code; fold mode copies them and rewrites only the norm tensors.
"""

from __future__ import annotations

import logging
from pathlib import Path

from lns_surgery.conversion import checkpoint
from lns_surgery.conversion.registry import Architecture, lookup
from lns_surgery.errors import LNSError
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
    except (OSError, ValueError, ImportError) as exc:
        raise LNSError(f"could not read the model config in '{folder}': {checkpoint._first_line(exc)}") from None


def architecture_for_checkpoint(
    folder: Path,
    config_dict: dict,
    trust_remote_code: bool = False,
    layers: str | None = None,
    norms: list[str] | None = None,
):
    """(Architecture, transformers config) for a stock checkpoint: the registry's entry when there is
    one, otherwise what inspection of the model built on the meta device finds."""
    import torch
    from transformers import AutoModelForCausalLM

    config = _load_config_object(folder, config_dict, trust_remote_code)
    arch = lookup(config_dict["model_type"])
    if arch is not None and layers is None and norms is None:
        return arch, config
    from lns_surgery.conversion.apply import architecture_for_model

    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    except Exception as exc:  # any failure of a model's own constructor
        raise LNSError(f"could not build '{config_dict['model_type']}' to inspect it: {checkpoint._first_line(exc)}") from None
    if any("--" in name for name in (getattr(config, "auto_map", None) or {}).values()):
        raise LNSError("the checkpoint's custom code lives in another repository; download it beside the weights first")
    return architecture_for_model(model, layers, norms), config


def _refuse_converted(config_dict: dict) -> None:
    if config_dict.get("lns"):
        raise LNSError(
            f"the input is already an LNS checkpoint (model_type {config_dict['model_type']}, "
            f"alpha {config_dict['lns'].get('alpha')}): converting it again would scale twice"
        )
    if config_dict.get("lns_folded"):
        raise LNSError("the input already has LayerNorm Scaling folded into its weights: converting it again would scale twice")


def _num_layers(config, arch: Architecture, folder: Path) -> int:
    count = getattr(config, "num_hidden_layers", None)
    if not isinstance(count, int) or count < 1:
        raise LNSError(f"cannot tell how many layers '{folder}' has")
    return count


def _tensor_name(tensors: dict, name: str) -> str | None:
    """``name`` as the checkpoint stores it: some (original GPT-2) drop the base model prefix."""
    if name in tensors:
        return name
    stripped = name.partition(".")[2]
    return stripped if stripped in tensors else None


def _check_norm_tensors(arch: Architecture, num_layers: int, tensors: dict | None) -> None:
    if tensors is None:
        return
    missing = [name for name in arch.norm_parameter_names(num_layers) if _tensor_name(tensors, name) is None]
    if missing:
        raise LNSError(f"the weights have no tensor '{missing[0]}' where the {arch.model_type} layout puts a norm")


def _fold_scales_into_weights(out: Path, arch_lns: dict, scales: list[float], tensors: dict) -> None:
    """Rewrite the norm tensors of the copied shards in ``out`` so stock classes compute LNS."""
    import torch

    kind = arch_lns["norm_kind"]
    if kind == "layernorm_no_affine":
        raise LNSError("these norms have no parameters to fold the scale into; use --mode code")
    if tensors is None:
        raise LNSError("fold mode rewrites safetensors weights; this checkpoint has only .bin files (use --mode code)")
    for index, scale in enumerate(scales):
        for norm in arch_lns["norms"]:
            for suffix in ("weight", "bias") if kind == "layernorm" else ("weight",):
                name = _tensor_name(tensors, f"{arch_lns['layers']}.{index}.{norm}.{suffix}")
                if name is None:
                    continue  # LayerNorm without bias
                entry = tensors[name]
                original = checkpoint.read_tensor(entry).to(torch.float32)
                if kind == "gemma_rmsnorm":  # (1 + w') = c (1 + w)
                    folded = scale * (1.0 + original) - 1.0
                else:
                    folded = scale * original
                checkpoint.write_tensor_in_place(out / entry.file.name, entry, folded)


def _copy_for_rewrite(folder: Path, out: Path, tensors: dict | None, link: str, skip: set[str]) -> None:
    """Copy the folder; shards that will be patched are always real copies, never hard links."""
    patched = {entry.file.name for entry in (tensors or {}).values()}
    checkpoint.copy_folder(folder, out, skip=skip | patched, link=link)
    for name in sorted(patched):
        checkpoint.copy_file(folder / name, out / name, link="auto")


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
) -> Path:
    """Convert a stock checkpoint (folder or Hub id) to LayerNorm Scaling; returns the output folder.

    ``mode="code"`` keeps the weights byte for byte and writes an LNS config and its code, loadable
    with ``trust_remote_code=True``. ``mode="fold"`` writes a stock checkpoint whose norm weights
    carry the scales, for runtimes that cannot run custom code.
    """
    if mode not in MODES:
        raise LNSError(f"unknown mode '{mode}'; expected one of {', '.join(MODES)}")
    if not 0.0 <= alpha <= 1.0:
        raise LNSError("alpha must be between 0 and 1")
    out = Path(out)
    checkpoint.check_output(out, overwrite)
    folder, provenance = checkpoint.resolve_source(source, revision)
    checkpoint.check_output(out, overwrite, source=folder)
    config_dict = checkpoint.read_config(folder)
    _refuse_converted(config_dict)
    tensors = checkpoint.weight_map(folder)
    arch, config = architecture_for_checkpoint(folder, config_dict, trust_remote_code, layers, norms)
    num_layers = _num_layers(config, arch, folder)
    _check_norm_tensors(arch, num_layers, tensors)
    lns = arch.lns_block(alpha, source=provenance)

    with checkpoint.atomic_output_dir(out, overwrite) as staging:
        if mode == "code":
            checkpoint.copy_folder(folder, staging, skip={"config.json"}, link=link)
            new_config = dict(config_dict)
            new_config["model_type"] = lns_layers.lns_model_type(arch.model_type)
            new_config["architectures"] = [lns_layers.lns_class_name(arch.classes["AutoModelForCausalLM"])]
            new_config["lns"] = lns
            checkpoint.write_json(staging / "config.json", new_config)
            lns_layers.write_custom_code(staging, lns)
        else:
            _copy_for_rewrite(folder, staging, tensors, link, skip={"config.json"})
            scales = [lns_layers.layer_scale(index, alpha) for index in range(num_layers)]
            _fold_scales_into_weights(staging, lns, scales, tensors)
            new_config = dict(config_dict)
            new_config["lns_folded"] = _folded_provenance(lns, scales)
            checkpoint.write_json(staging / "config.json", new_config)
    logger.debug("wrote %s (%s mode, %d layers)", out, mode, num_layers)
    return out


def _folded_provenance(lns: dict, scales: list[float]) -> dict:
    keep = ("schema_version", "rule", "alpha", "base_model_type", "layers", "norms", "norm_kind", "source", "tool_version")
    provenance = {key: lns[key] for key in keep if key in lns}
    provenance["scales"] = scales
    return provenance


def fold(source: str | Path, out: str | Path, *, overwrite: bool = False, link: str = "auto") -> Path:
    """Turn an LNS code-mode checkpoint into a stock one whose norm weights carry the scales."""
    out = Path(out)
    checkpoint.check_output(out, overwrite)
    folder, _ = checkpoint.resolve_source(source)
    checkpoint.check_output(out, overwrite, source=folder)
    config_dict = checkpoint.read_config(folder)
    if config_dict.get("lns_folded"):
        raise LNSError("the input is already folded")
    lns = config_dict.get("lns")
    if not lns:
        raise LNSError("the input is not an LNS checkpoint; use `convert --mode fold` for a stock model")
    tensors = checkpoint.weight_map(folder)
    num_layers = _num_layers_from_dict(config_dict)
    scales = [lns_layers.layer_scale(index, lns.get("alpha", 1.0)) for index in range(num_layers)]
    stock_config = {key: value for key, value in config_dict.items() if key not in {"lns", "auto_map"}}
    stock_config["model_type"] = lns["base_model_type"]
    stock_config["architectures"] = [lns["base_classes"]["AutoModelForCausalLM"].rsplit(".", 1)[-1]]
    if any("." in name for name in lns["base_classes"].values()):
        stock_config["auto_map"] = {auto: name for auto, name in _base_auto_map(lns).items()}
    stock_config["lns_folded"] = _folded_provenance(lns, scales)
    with checkpoint.atomic_output_dir(out, overwrite) as staging:
        _copy_for_rewrite(folder, staging, tensors, link, skip={"config.json", *lns_layers.CODE_FILES})
        _fold_scales_into_weights(staging, lns, scales, tensors)
        checkpoint.write_json(staging / "config.json", stock_config)
    return out


def _base_auto_map(lns: dict) -> dict:
    names = dict(lns["base_classes"])
    mapping = {"AutoConfig": names.pop("config")}
    mapping.update(names)
    return mapping


def _num_layers_from_dict(config_dict: dict) -> int:
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        if isinstance(config_dict.get(key), int):
            return config_dict[key]
    text_config = config_dict.get("text_config")
    if isinstance(text_config, dict):
        return _num_layers_from_dict(text_config)
    raise LNSError("cannot tell how many layers the checkpoint has")


def inspect_checkpoint(
    source: str | Path,
    *,
    trust_remote_code: bool = False,
    layers: str | None = None,
    norms: list[str] | None = None,
    revision: str | None = None,
) -> dict:
    """What LNS does (or did) to a checkpoint: status, layer path, norms, kind and the scale per layer."""
    folder, _ = checkpoint.resolve_source(source, revision)
    config_dict = checkpoint.read_config(folder)
    report = {"source": str(source), "model_type": config_dict["model_type"]}
    if config_dict.get("lns"):
        lns = config_dict["lns"]
        status, alpha, origin = "lns", lns.get("alpha", 1.0), "checkpoint"
    elif config_dict.get("lns_folded"):
        lns = config_dict["lns_folded"]
        status, alpha, origin = "lns-folded", lns.get("alpha", 1.0), "checkpoint"
    else:
        arch, _ = architecture_for_checkpoint(folder, config_dict, trust_remote_code, layers, norms)
        lns = arch.lns_block(1.0)
        status, alpha, origin = "stock", 1.0, "detected" if arch.detected else "registry"
    num_layers = _num_layers_from_dict(config_dict)
    report.update(
        status=status,
        alpha=alpha,
        architecture_from=origin,
        base_model_type=lns.get("base_model_type", config_dict["model_type"]),
        layers=lns["layers"],
        num_layers=num_layers,
        norms=list(lns["norms"]),
        norm_kind=lns["norm_kind"],
        scales=[lns_layers.layer_scale(index, alpha) for index in range(num_layers)],
    )
    if status == "stock":
        report["note"] = "scales shown are what `convert` would apply"
    return report
