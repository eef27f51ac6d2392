"""LayerNorm Scaling on a model that is already in memory."""

from __future__ import annotations

import dataclasses
import logging

from torch import nn

from lns_surgery.conversion.registry import Architecture, lookup
from lns_surgery.core import checkpoint
from lns_surgery.core.errors import LNSError
from lns_surgery.core.lns_status import lns_status

logger = logging.getLogger(__name__)


def architecture_for_model(model: nn.Module, layers: str | None = None, norms: list[str] | None = None,
                           force: bool = False) -> Architecture:
    """Where LNS acts in ``model``, with the norm form and fold rule proven on its own norm classes.

    The model's data flow decides, and a registry entry must agree with it (a checkpoint whose config
    changes the block, such as an MoE variant with a third pre-norm, is refused rather than converted
    in part); ``layers``/``norms`` from the user override both (named norms must be pre-sublayer norms by
    the data flow unless ``force``). A registry entry marked untraceable
    is used as it stands.
    """
    from lns_surgery.conversion.detect import detect_architecture, prove_norms, stock_classes

    lns = getattr(model.config, "lns", None)
    if lns and layers is None and norms is None:  # an LNS model describes itself
        return Architecture(lns["base_model_type"], lns["layers"], tuple(lns["norms"]), lns["norm_kind"],
                            dict(lns["base_classes"]))
    arch = lookup(model.config.model_type)
    if arch is not None and (layers is not None or norms is not None):
        detected = detect_architecture(model, layers=layers or arch.layers, norms=norms, force=force)
        return dataclasses.replace(detected, model_type=arch.model_type)
    if arch is not None and arch.untraceable:
        classes = stock_classes(model.config, type(model).__name__)
        return prove_norms(dataclasses.replace(arch, classes=classes), model)
    detected = detect_architecture(model, layers=layers, norms=norms, force=force)
    if arch is None:
        if layers is None and norms is None:
            warn_unregistered(detected)
        return detected
    if detected.layers != arch.layers or detected.norms not in (arch.norms, arch.moe_norms):
        raise LNSError(
            f"this '{arch.model_type}' model's data flow shows layers '{detected.layers}' with pre-sublayer norms "
            f"{list(detected.norms)}, not the registry's '{arch.layers}' with {list(arch.norms)}; "
            "state the layout with --layers/--norms"
        )
    return dataclasses.replace(detected, detected=False)


def warn_unregistered(arch: Architecture) -> None:
    """The layout of a family the registry does not know was found by tracing: say so, so it gets checked."""
    logger.warning(
        "'%s' is not in the registry: its data flow shows layers '%s' and pre-sublayer norms %s. "
        "Check them, or state them with --layers/--norms.",
        arch.model_type, arch.layers, ", ".join(arch.norms),
    )


def is_lns_model(model: nn.Module) -> bool:
    return lns_status(getattr(model, "config", None)).kind == "lns"


def apply_layernorm_scaling(
    model: nn.Module,
    alpha: float = 1.0,
    *,
    layers: str | None = None,
    norms: list[str] | None = None,
    force: bool = False,
) -> nn.Module:
    """Turn a stock transformers model into its LNS counterpart, in place, and return it.

    The model's class becomes the LNS class (``LlamaForCausalLM`` -> ``LNSLlamaForCausalLM``) and its
    config gets ``model_type`` ``lns_<base>`` and an ``lns`` block, so ``save_pretrained`` writes a
    checkpoint that loads with ``trust_remote_code=True`` and never as the stock model. Parameters,
    their names and the state dict are unchanged. A model that already has LNS is returned as it is
    (the scales are never applied twice); change its ``alpha`` with ``model.set_lns_alpha``.
    """
    from lns_surgery.modeling.auto import register
    from lns_surgery.modeling.lns_layers import apply_scaling

    config = model.config
    status = lns_status(config)
    if status.kind == "lns":
        logger.warning("the model already has LayerNorm Scaling (alpha=%s); left unchanged", status.alpha)
        return model
    if status.kind == "lns-folded":
        raise LNSError("this model's weights already have LayerNorm Scaling folded in; scaling again would apply it twice")
    if type(model).__name__.startswith("Peft"):
        raise LNSError("apply LayerNorm Scaling before wrapping the model with PEFT")
    arch = architecture_for_model(model, layers, norms, force)
    lns = arch.lns_block(alpha, source=checkpoint.source_record(getattr(config, "name_or_path", "") or None))
    classes = register(lns)
    auto_name = next((auto for auto, name in arch.classes.items() if name == type(model).__name__), None)
    if classes is None or auto_name is None or auto_name == "config":
        raise LNSError(
            f"no LNS class for {type(model).__name__}; supported: "
            + ", ".join(name for auto, name in arch.classes.items() if auto != "config")
        )
    model.__class__ = classes[auto_name]
    config.__class__ = classes["config"]
    # A loaded config holds its model_type as an instance attribute, which would hide the LNS class's
    # lns_<base> from everything that asks (to_dict() says lns_<base>, config.model_type the stock type):
    # kernel and PEFT tables keyed by model type would treat the model as the stock one.
    vars(config).pop("model_type", None)
    config.lns = lns
    config.architectures = [model.__class__.__name__]
    apply_scaling(model, lns)
    return model


def set_lns_alpha(model: nn.Module, alpha: float) -> None:
    """Set the LNS strength of every block (1 = full 1/sqrt(l), 0 = the original function)."""
    from lns_surgery.modeling.lns_layers import set_alpha

    if not is_lns_model(model):
        raise LNSError("the model has no LayerNorm Scaling to adjust")
    set_alpha(model, alpha)
