"""Finding where LayerNorm Scaling acts in an architecture the registry does not know.

Works on a model built on the ``meta`` device (no weights, no memory): the decoder block list is the
longest ModuleList of identical blocks; the pre-sublayer norms are the block's norms whose *output
tensor* is handed to a sibling sublayer (attention or MLP), which a forward pass with hooks shows.
Norms that receive a sublayer's output instead (post-norm designs, Gemma-2's post norms) are never
picked, and q/k norms are inside the attention module, not siblings, so they are never picked either.
"""

from __future__ import annotations

import dataclasses
import logging

import torch
from torch import nn

from lns_surgery.conversion.registry import AUTO_CLASSES, Architecture
from lns_surgery.conversion.norm_math import fold_rule
from lns_surgery.errors import LNSError
from lns_surgery.modeling.lns_layers import exact_kind, resolve_layers

logger = logging.getLogger(__name__)


class _StopForward(Exception):
    pass


def find_layer_list(model: nn.Module) -> str:
    """Dotted path of the longest ModuleList whose entries all share one class."""
    best, best_len = None, 0
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > best_len:
            if len({type(child) for child in module}) == 1:
                best, best_len = name, len(module)
    if best is None:
        raise LNSError("could not find the decoder's layer list; name it with --layers (e.g. model.layers)")
    return best


def _looks_like_norm(name: str, module: nn.Module) -> bool:
    return isinstance(module, nn.LayerNorm) or "norm" in type(module).__name__.lower() or "norm" in name.lower()


def find_pre_norms(model: nn.Module, layers_path: str) -> list[str]:
    """Names (inside one block) of the norms whose outputs feed the block's sublayers, in call order."""
    block = model.get_submodule(layers_path)[0]
    norm_outputs: dict[int, str] = {}
    keep_alive: list = []  # keeps ids unique while the pass runs
    consumed: list[str] = []
    handles = []

    def record_norm(name):
        def hook(module, args, output):
            keep_alive.append(output)
            norm_outputs[id(output)] = name

        return hook

    def record_sublayer(module, args, kwargs):
        for value in list(args) + list(kwargs.values()):
            name = norm_outputs.get(id(value))
            if name is not None and name not in consumed:
                consumed.append(name)

    def stop(module, args, output):
        raise _StopForward

    for name, child in block.named_children():
        if _looks_like_norm(name, child):
            handles.append(child.register_forward_hook(record_norm(name)))
        else:
            handles.append(child.register_forward_pre_hook(record_sublayer, with_kwargs=True))
    handles.append(block.register_forward_hook(stop))
    device = next(model.parameters()).device
    ids = torch.ones(1, 4, dtype=torch.long, device=device)
    # Some models check the mask's values and others check the ids' (for padding), which meta
    # tensors cannot answer: try without a mask, then with one.
    attempts = ({"input_ids": ids}, {"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    pad_token_id = getattr(model.config, "pad_token_id", None)
    model.config.pad_token_id = None  # skips the padding check on the ids
    try:
        for inputs in attempts:
            try:
                with torch.no_grad():
                    model(**inputs)
            except _StopForward:
                break
            except Exception as exc:  # e.g. MoE kernels that refuse meta tensors: keep what was seen
                logger.debug("detection forward stopped early: %s", exc)
                if consumed:
                    break
    finally:
        model.config.pad_token_id = pad_token_id
        for handle in handles:
            handle.remove()
    return consumed


def norm_kind(module: nn.Module, preferred: str | None = None) -> str:
    """The form LNS scales this norm with: a weight form proven on a CPU copy of its class, else ``output``."""
    return exact_kind(module, preferred)


def prove_norms(arch: Architecture, model: nn.Module) -> Architecture:
    """``arch`` with the norm form and fold rule proven on this model's own norm classes.

    Every block must have every norm; one form (and one fold rule) serves all of them, so where the
    classes disagree the output form, which is exact for any norm, is used (and folding is refused).
    """
    blocks = resolve_layers(model, arch.layers)
    modules = []
    for index, block in enumerate(blocks):
        for name in arch.norms:
            try:
                modules.append(block.get_submodule(name))
            except AttributeError:
                raise LNSError(
                    f"block {index} ({type(block).__name__}) of '{arch.layers}' has no norm '{name}'; "
                    "state the norms of every block with --norms"
                ) from None
    kinds = {norm_kind(module, arch.norm_kind or None) for module in modules}
    rules = {fold_rule(module) for module in modules}
    return dataclasses.replace(
        arch,
        norm_kind=kinds.pop() if len(kinds) == 1 else "output",
        fold_rule=rules.pop() if len(rules) == 1 else None,
        norm_classes=tuple(sorted({type(module).__name__ for module in modules})),
    )


def stock_classes(config) -> dict:
    """Names of the stock classes for ``config.model_type`` (transformers' own, or the checkpoint's custom code)."""
    from transformers.models.auto import configuration_auto, modeling_auto

    model_type = config.model_type
    mappings = {
        "AutoModel": modeling_auto.MODEL_MAPPING_NAMES,
        "AutoModelForCausalLM": modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        "AutoModelForSequenceClassification": modeling_auto.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES,
    }
    if model_type in configuration_auto.CONFIG_MAPPING_NAMES:
        classes = {"config": configuration_auto.CONFIG_MAPPING_NAMES[model_type]}
        classes.update({auto: names[model_type] for auto, names in mappings.items() if model_type in names})
        return classes
    # Custom code: auto_map entries look like "modeling_foo.FooForCausalLM" (or "repo--modeling_foo.Foo").
    auto_map = getattr(config, "auto_map", None) or {}
    classes = {"config": auto_map.get("AutoConfig", "").split("--")[-1]}
    for auto in AUTO_CLASSES:
        if auto in auto_map:
            classes[auto] = auto_map[auto].split("--")[-1]
    return classes


def detect_architecture(model: nn.Module, layers: str | None = None, norms: list[str] | None = None) -> Architecture:
    """An Architecture for ``model`` (best built on the meta device), from inspection or from the user."""
    model_type = model.config.model_type
    layers_path = layers or find_layer_list(model)
    try:
        block_list = model.get_submodule(layers_path)
    except AttributeError:
        raise LNSError(f"'{layers_path}' is not a module of this {model_type} model") from None
    if norms is None:
        norms = find_pre_norms(model, layers_path)
        if not norms:
            raise LNSError(
                f"no norm feeds attention or the MLP in '{model_type}' blocks (post-norm or norm-free design): "
                "LayerNorm Scaling needs pre-sublayer norms"
            )
        logger.warning(
            "'%s' is not in the registry: detected layers '%s' and pre-sublayer norms %s. "
            "Check them, or state them with --layers/--norms.",
            model_type, layers_path, ", ".join(norms),
        )
    first_block = block_list[0]
    for name in norms:
        try:
            first_block.get_submodule(name)
        except AttributeError:
            raise LNSError(f"block '{layers_path}.0' has no module '{name}'") from None
    arch = Architecture(
        model_type=model_type,
        layers=layers_path,
        norms=tuple(norms),
        norm_kind="output",
        classes=stock_classes(model.config),
        detected=True,
    )
    return prove_norms(dataclasses.replace(arch, norm_kind=""), model)
