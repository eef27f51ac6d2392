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

import copy
import dataclasses
import logging

import torch
import torch.fx.experimental._config  # noqa: F401  (the meta nonzero switch)
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from lns_surgery.conversion.registry import AUTO_CLASSES, Architecture, classes_for_type
from lns_surgery.conversion.norm_math import fold_rule
from lns_surgery.core.errors import LNSError
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
    # A norm is a leaf: a child that holds modules (DBRX's "norm_attn_norm") is a sublayer.
    named = isinstance(module, nn.LayerNorm) or "norm" in type(module).__name__.lower() or "norm" in name.lower()
    return named and not any(True for _ in module.children())


class _DataFlow(TorchFunctionMode):
    """Labels every tensor with the data it carries unchanged, through every torch operation.

    A block's input is labelled ("residual", block) and a norm's output ("norm", block, name). Labels
    pass through the operations that move or add data without transforming it (additions, reshapes,
    indexing and routing, concatenation, dropout, scaling by a constant) and through in-place writes
    (``index_add_``, ``x[i] = y``); any other operation (a linear layer, an activation, a gate that
    multiplies two inputs) gives data of its own, unlabelled. So the residual stream is followed
    through a block and through sublayers that add it back themselves (BLOOM, MPT), and a norm's
    output is followed to whichever sublayer receives it, however reshaped or routed.
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
        if func in _META_ANSWERS and args and getattr(args[0], "is_meta", False):
            # A meta tensor has no values. Checks on values (is the mask all ones? is the batch packed?)
            # get a fixed answer: they choose a code path, and the data flow is what is traced.
            return _META_ANSWERS[func](args[0])
        result = func(*args, **kwargs)
        name, writes_first_argument = _operation(func)
        if name not in _CARRYING:
            return result
        if name in _SCALING:
            labelled = [leaf for leaf in tree_flatten((args, kwargs))[0]
                        if isinstance(leaf, torch.Tensor) and self.labels.get(id(leaf))]
            if len(labelled) > 1:  # a product of two data tensors (a gate) is new data
                return result
        labels = self.of((args, kwargs))
        if labels:
            self.set(result, labels)
            if writes_first_argument and args:
                self.set(args[0], labels)
        return result


def _operation(func) -> tuple[str, bool]:
    """An operation's base name (``add_``, ``__iadd__`` and ``torch.add`` are all ``add``) and whether
    it writes into its first argument."""
    raw = getattr(func, "__name__", "")
    name = raw.strip("_")
    augmented = raw.startswith("__i") and name[1:] in _CARRYING  # __iadd__, __imul__, ...
    if augmented:
        name = name[1:]
    in_place = augmented or name == "setitem" or (raw.endswith("_") and not raw.endswith("__"))
    return name, in_place


# Operations whose output carries its inputs' data unchanged (by name, so methods, functions and
# in-place variants all count). Anything else makes new data.
_SCALING = {"mul", "div", "true_divide", "truediv", "rmul", "rtruediv"}
_CARRYING = _SCALING | {
    "add", "radd", "sub", "rsub", "neg", "pos", "sum",
    "view", "view_as", "reshape", "reshape_as", "flatten", "unflatten", "squeeze", "unsqueeze", "permute",
    "transpose", "t", "expand", "expand_as", "repeat", "repeat_interleave", "contiguous", "clone", "detach",
    "to", "type", "type_as", "float", "half", "bfloat16", "double", "narrow", "select", "movedim",
    "getitem", "setitem", "index_select", "gather", "take_along_dim", "masked_select", "index_add",
    "index_copy", "index_put", "scatter", "scatter_add", "scatter_reduce", "masked_scatter", "masked_fill",
    "where", "copy", "cat", "concat", "concatenate", "stack", "split", "chunk", "unbind", "tensor_split",
    "dropout", "roll", "flip", "pad",
}


_META_ANSWERS = {
    torch.Tensor.__bool__: lambda tensor: True,
    torch.Tensor.item: lambda tensor: True if tensor.dtype == torch.bool else 1 if not tensor.is_floating_point() else 1.0,
    torch.Tensor.tolist: lambda tensor: torch.ones(tensor.shape, dtype=tensor.dtype, device="cpu").tolist(),
}


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
    Some models check the attention mask's values and others the ids' (packing, padding), which meta
    tensors cannot answer: the forward is tried without a mask, then with one.
    """
    # The trace runs on a bf16 meta twin: no memory, no compute, the caller's model untouched (and the
    # meta kernels of grouped expert matmuls accept bf16 only).
    if _device(model).type == "meta":
        model = copy.deepcopy(model).to(torch.bfloat16)
    else:
        with torch.device("meta"):  # from a copy of the config, which building may write to
            model = type(model)._from_config(copy.deepcopy(model.config)).to(torch.bfloat16)
    blocks = model.get_submodule(layers_path)
    ids = torch.ones(1, 4, dtype=torch.long, device=_device(model))
    traces = []
    for inputs in ({"input_ids": ids}, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}):
        traces = _trace_once(model, blocks, inputs)
        if all(trace.finished for trace in traces):
            break
    return traces


def _trace_once(model: nn.Module, blocks: nn.ModuleList, inputs: dict) -> list[_BlockTrace]:
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
    try:
        # nonzero() on meta: assume every element is non-zero (routing then sends every token everywhere).
        with torch.no_grad(), flow, torch.fx.experimental._config.patch(meta_nonzero_assume_all_nonzero=True):
            model(**inputs)
    except Exception as exc:
        logger.debug("traced forward stopped: %s", exc)
    finally:
        for handle in handles:
            handle.remove()
        for module in patched:
            del module.forward
    return traces


def _record_input(flow, trace, norm, args) -> None:  # a hook's return value would replace the input
    trace.norm_inputs.setdefault(norm, flow.of(args))


def _record_reads(flow, trace, index, sublayer, value) -> None:
    """Which of the block's norms this sublayer reads. An argument that carries the residual stream
    itself (a router reading the raw stream) says nothing about the norms whose outputs were added
    into that stream earlier, so only arguments without the residual count."""
    for leaf in tree_flatten(value)[0]:
        labels = flow.of(leaf) if isinstance(leaf, torch.Tensor) else frozenset()
        if ("residual", index) in labels:
            continue
        for label in labels:
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
    kinds = {exact_kind(module, arch.norm_kind or None) for module in modules}
    rules = {fold_rule(module) for module in modules}
    return dataclasses.replace(
        arch,
        norm_kind=kinds.pop() if len(kinds) == 1 else "output",
        fold_rule=rules.pop() if len(rules) == 1 else None,
        norm_classes=tuple(sorted({type(module).__name__ for module in modules})),
    )


def stock_classes(config, built: str | None = None) -> dict:
    """Names of the stock classes for ``config.model_type`` (transformers' own, or the checkpoint's custom code).

    ``built`` is the class the model was built as: where that is the image-text model and the family's
    causal-LM class is another one (Qwen3.5's text-only class), the Auto classes that would build a
    different model from this config are left out.
    """
    classes = classes_for_type(config.model_type)
    if classes:
        if built is not None and built == classes.get("AutoModelForImageTextToText") != classes.get("AutoModelForCausalLM"):
            classes = {auto: name for auto, name in classes.items()
                       if auto in ("config", "AutoModel", "AutoModelForImageTextToText")}
        return classes
    # Custom code: auto_map entries look like "modeling_foo.FooForCausalLM" (or "repo--modeling_foo.Foo").
    auto_map = getattr(config, "auto_map", None) or {}
    classes = {"config": auto_map.get("AutoConfig", "").split("--")[-1]}
    for auto in AUTO_CLASSES:
        if auto in auto_map:
            classes[auto] = auto_map[auto].split("--")[-1]
    return classes


def _check_named_norms(model: nn.Module, layers_path: str, block_list, norms: list[str]) -> None:
    """Refuse named norms the data flow does not show as pre-sublayer norms of every block."""
    try:
        per_block = find_pre_norms(model, layers_path)
    except LNSError as exc:  # the user's statement is the only layout there is; say it was not checked
        logger.warning("the norms given could not be checked against the model's data flow (%s); scaling them as given", exc)
        return
    for index, (block, pre) in enumerate(zip(block_list, per_block)):
        for name in norms:
            if name not in pre:
                raise LNSError(
                    f"'{name}' is not a pre-sublayer norm of block {index} ({type(block).__name__}): its data flow shows "
                    f"{', '.join(pre) or 'none'}. Post-sublayer, q/k and final norms are never scaled; pass --force to "
                    "scale it anyway"
                )


def detect_architecture(model: nn.Module, layers: str | None = None, norms: list[str] | None = None,
                        force: bool = False) -> Architecture:
    """An Architecture for ``model`` from its data flow (``norms`` and ``layers`` from the user win).

    Norms the user names must be pre-sublayer norms by the data flow, unless ``force``: the tool never
    scales a post-sublayer, q/k or final norm (or a module that is not a norm) by accident.
    """
    model_type = model.config.model_type
    layers_path = layers or find_layer_list(model)
    try:
        block_list = model.get_submodule(layers_path)
    except AttributeError:
        raise LNSError(f"'{layers_path}' is not a module of this {model_type} model") from None
    if not isinstance(block_list, (nn.ModuleList, nn.Sequential)) or len(block_list) == 0:
        raise LNSError(f"'{layers_path}' is a {type(block_list).__name__}, not the list of decoder blocks (such as 'model.layers')")
    if norms is not None:
        repeated = sorted({name for name in norms if list(norms).count(name) > 1})
        if repeated:
            raise LNSError(f"--norms names '{repeated[0]}' more than once")
        if not force:
            _check_named_norms(model, layers_path, block_list, list(norms))
    if norms is None:
        per_block = find_pre_norms(model, layers_path)
        distinct = {tuple(names) for names in per_block}
        if len(distinct) > 1:
            kinds = "; ".join(sorted({f"{type(block).__name__} {list(names) or 'none'}" for block, names in zip(block_list, per_block)}))
            raise LNSError(
                f"the '{model_type}' blocks do not share their pre-sublayer norms ({kinds}); one set of norms "
                "for every block is all a checkpoint can record: state the norms with --norms"
            )
        norms = list(distinct.pop()) if distinct else []
        if not norms:
            raise LNSError(
                f"no norm of the '{model_type}' blocks reads the residual stream and feeds a sublayer (a post-norm "
                "or norm-free design, or norms nested inside the sublayers): LayerNorm Scaling needs pre-sublayer norms"
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
        classes=stock_classes(model.config, type(model).__name__),
        detected=True,
    )
    return prove_norms(arch, model)
