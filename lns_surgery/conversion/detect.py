"""Finding where LayerNorm Scaling acts in an architecture the registry does not know.

Works on a model built on the ``meta`` device (no weights, no memory). The decoder block list is the
ModuleList in the language model with as many blocks as the text config has layers. Which norms are
pre-sublayer norms is decided by data flow: one forward labels every tensor with where its data came
from (``_DataFlow``), so a norm is a pre-sublayer norm when it reads the block's residual stream and
its output, however reshaped or routed, reaches a sublayer. Norms on a sublayer's output (sandwich
norms) are left stock; q/k norms live inside the attention module and are never candidates. A block
whose norms cannot all be classified, or whose residual stream only leaves through a norm
(post-norm), is refused with a reason rather than converted in part.
"""

from __future__ import annotations

import dataclasses
import logging

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from lns_surgery.conversion.registry import AUTO_CLASSES, Architecture
from lns_surgery.conversion.norm_math import fold_rule
from lns_surgery.errors import LNSError
from lns_surgery.modeling.lns_layers import exact_kind, resolve_layers

logger = logging.getLogger(__name__)


def _text_layer_count(config) -> int | None:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    count = getattr(text, "num_hidden_layers", None)
    return count if isinstance(count, int) and count > 0 else None


def find_layer_list(model: nn.Module) -> str:
    """Dotted path of the decoder's block list.

    The ModuleList inside the language model (``get_decoder()``, so never a vision tower) with as many
    entries as the text config has layers; failing that, the longest ModuleList of one class.
    """
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    scope = decoder if isinstance(decoder, nn.Module) else model
    count = _text_layer_count(model.config)
    lists = [(name, module) for name, module in model.named_modules() if isinstance(module, nn.ModuleList) and len(module)]
    in_scope = {id(module) for module in scope.modules()}
    sized = [name for name, module in lists if id(module) in in_scope and len(module) == count]
    if sized:
        return sized[0]  # the outermost: named_modules lists parents first
    same_class = [(len(module), name) for name, module in lists if len({type(child) for child in module}) == 1]
    if not same_class:
        raise LNSError("could not find the decoder's layer list; name it with --layers (e.g. model.layers)")
    return max(same_class, key=lambda item: item[0])[1]


def _looks_like_norm(name: str, module: nn.Module) -> bool:
    return isinstance(module, nn.LayerNorm) or "norm" in type(module).__name__.lower() or "norm" in name.lower()


class _DataFlow(TorchFunctionMode):
    """Labels every tensor with where its data came from, through every torch operation.

    A block's input is labelled ("residual", block); a norm's output carries only ("norm", block, name),
    so the residual stream is traced through additions, reshapes, routing and indexing but never
    through a norm. Mutating operations (``index_add_``, ``x[i] = y``) label the tensor they write.
    """

    def __init__(self):
        super().__init__()
        self.labels: dict[int, frozenset] = {}
        self._alive: list = []  # keeps labelled tensors alive, so that ids stay unique

    def of(self, value) -> frozenset:
        found = frozenset()
        for leaf in tree_flatten(value)[0]:
            if isinstance(leaf, torch.Tensor):
                found |= self.labels.get(id(leaf), frozenset())
        return found

    def set(self, value, labels: frozenset, replace: bool = False) -> None:
        for leaf in tree_flatten(value)[0]:
            if isinstance(leaf, torch.Tensor):
                self.labels[id(leaf)] = labels if replace else self.labels.get(id(leaf), frozenset()) | labels
                self._alive.append(leaf)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        labels = self.of((args, kwargs))
        if labels:
            self.set(result, labels)
            name = getattr(func, "__name__", "")
            if args and (name.endswith("_") or name == "__setitem__"):
                self.set(args[0], labels)
        return result


@dataclasses.dataclass
class _BlockTrace:
    norm_inputs: dict = dataclasses.field(default_factory=dict)  # norm name -> labels of its input
    consumed: dict = dataclasses.field(default_factory=dict)  # norm name -> sublayers that read its output
    residual_reaches_output: bool = False
    finished: bool = False


def trace_blocks(model: nn.Module, layers_path: str) -> list[_BlockTrace]:
    """One forward of the model (meta device is enough) with every block's data flow traced.

    A sublayer that cannot run on the meta device (data-dependent MoE routing) is replaced, for that
    call, by a stand-in that returns a tensor shaped like its input and carrying its input's labels.
    """
    blocks = model.get_submodule(layers_path)
    flow = _DataFlow()
    traces = [_BlockTrace() for _ in blocks]
    handles, patched = [], []

    for index, block in enumerate(blocks):
        trace = traces[index]
        residual = frozenset({("residual", index)})

        def enter(module, args, kwargs, residual=residual):
            hidden = args[0] if args else kwargs.get("hidden_states")
            flow.set(hidden, residual, replace=True)

        def leave(module, args, kwargs, output, trace=trace, residual=residual):
            trace.residual_reaches_output = bool(flow.of(output if isinstance(output, torch.Tensor) else output[0]) & residual)
            trace.finished = True

        handles.append(block.register_forward_pre_hook(enter, with_kwargs=True))
        handles.append(block.register_forward_hook(leave, with_kwargs=True))
        for name, child in block.named_children():
            if _looks_like_norm(name, child):
                handles.append(child.register_forward_pre_hook(
                    lambda m, args, trace=trace, name=name: _record_input(flow, trace, name, args)))
                handles.append(child.register_forward_hook(
                    lambda m, args, out, index=index, name=name: flow.set(out, frozenset({("norm", index, name)}), replace=True)))
            else:
                handles.append(child.register_forward_pre_hook(
                    lambda m, args, kwargs, trace=trace, index=index, name=name: _record_reads(flow, trace, index, name, (args, kwargs)),
                    with_kwargs=True))
                patched.append(_run_or_stand_in(child, flow))

    ids = torch.ones(1, 4, dtype=torch.long, device=_device(model))
    pad_token_id = getattr(model.config, "pad_token_id", None)
    model.config.pad_token_id = None  # meta ids cannot answer a padding check
    try:
        with torch.no_grad(), flow:
            model(input_ids=ids)
    except Exception as exc:
        logger.debug("traced forward stopped: %s", exc)
    finally:
        model.config.pad_token_id = pad_token_id
        for handle in handles:
            handle.remove()
        for module in patched:
            del module.forward
    return traces


def _record_input(flow, trace, norm, args) -> None:  # a hook's return value would replace the input
    trace.norm_inputs.setdefault(norm, flow.of(args))


def _record_reads(flow, trace, index, sublayer, value) -> None:
    for label in flow.of(value):
        if label[0] == "norm" and label[1] == index:
            trace.consumed.setdefault(label[2], set()).add(sublayer)


def _device(model):
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("meta")


def _run_or_stand_in(module: nn.Module, flow: _DataFlow) -> nn.Module:
    forward = module.forward

    def guarded(*args, **kwargs):
        try:
            return forward(*args, **kwargs)
        except Exception as exc:
            tensors = [leaf for leaf in tree_flatten((args, kwargs))[0] if isinstance(leaf, torch.Tensor) and leaf.is_floating_point()]
            if not tensors:
                raise
            logger.debug("%s cannot run here (%s): traced through a stand-in", type(module).__name__, exc)
            stand_in = torch.zeros_like(tensors[0])
            flow.set(stand_in, flow.of((args, kwargs)))
            return stand_in

    module.forward = guarded
    return module


def classify_block_norms(block: nn.Module, trace: _BlockTrace, layers_path: str, index: int) -> list[str]:
    """The pre-sublayer norms of one traced block, in call order; refuses what it cannot classify."""
    where = f"block {index} ({type(block).__name__}) of '{layers_path}'"
    if not trace.finished:
        raise LNSError(f"{where} could not be traced on the meta device; state the norms with --norms")
    pre = []
    for name, input_labels in trace.norm_inputs.items():
        reads_residual = ("residual", index) in input_labels
        if trace.consumed.get(name):
            if not reads_residual:
                raise LNSError(f"{where}: norm '{name}' feeds a sublayer but does not read the residual stream; cannot classify it")
            pre.append(name)
        elif reads_residual:
            raise LNSError(
                f"{where}: norm '{name}' normalises the residual stream but feeds no sublayer "
                "(a post-norm design): LayerNorm Scaling needs pre-sublayer norms"
            )
        # else: it normalises a sublayer's output before the residual add (sandwich norms): left stock
    if pre and not trace.residual_reaches_output:
        raise LNSError(
            f"{where}: the residual stream reaches the block output only through a norm (a post-norm design): "
            "LayerNorm Scaling needs pre-sublayer norms"
        )
    return pre


def find_pre_norms(model: nn.Module, layers_path: str) -> list[list[str]]:
    """Per block, the names of the norms whose outputs feed the block's sublayers, in call order."""
    blocks = model.get_submodule(layers_path)
    traces = trace_blocks(model, layers_path)
    return [classify_block_norms(block, trace, layers_path, i) for i, (block, trace) in enumerate(zip(blocks, traces))]


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
        per_block = find_pre_norms(model, layers_path)
        distinct = {tuple(names) for names in per_block}
        if len(distinct) > 1:
            raise LNSError(
                f"the blocks of '{model_type}' have different pre-sublayer norms ({sorted(distinct)}); "
                "state the norms with --norms"
            )
        norms = list(distinct.pop()) if distinct else []
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
