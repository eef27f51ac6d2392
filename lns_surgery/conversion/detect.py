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
import inspect
import logging

import torch
import torch.fx.experimental._config  # noqa: F401  (the meta nonzero switch)
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from lns_surgery.conversion.registry import AUTO_CLASSES, Architecture, classes_for_type
from lns_surgery.conversion.norm_math import fold_rule
from lns_surgery.core.errors import LNSError, first_line
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
    # A norm is a leaf: a child that holds modules (DBRX's "norm_attn_norm") is a sublayer. An
    # nn.Identity in a norm's place (ModernBERT's first block) computes nothing: it is no norm, and
    # as it returns its input object, labelling its output would relabel the residual stream itself.
    named = isinstance(module, nn.LayerNorm) or "norm" in type(module).__name__.lower() or "norm" in name.lower()
    return named and not isinstance(module, nn.Identity) and not any(True for _ in module.children())


# Modules that pass their input on (in eval mode): a norm whose output reaches a sublayer through them
# feeds that sublayer, and one whose output reaches only them (T5Gemma 2's dropout after its post-norms)
# feeds none.
_PASS_THROUGH = (nn.Identity, nn.modules.dropout._DropoutNd)


def _wrapper(module: nn.Module) -> bool:
    """A child of a block that holds norms of its own beside sublayers (DBRX's ``norm_attn_norm``:
    norm, attention, norm), or a list of norms and sublayers (LongCat-Flash's two attentions per
    block), which the nested trace looks into."""
    if isinstance(module, (nn.ModuleList, nn.ModuleDict)):
        return True
    norms_inside = any(_looks_like_norm(name, child) for name, child in module.named_children())
    return norms_inside and not _looks_like_norm("", module)


def _units(block: nn.Module, nested: bool) -> list[tuple[str, nn.Module]]:
    """The parts of a block the trace watches: its children, and with ``nested`` the children of its
    wrappers in their place (named by their path from the block)."""
    units = []
    for name, child in block.named_children():
        if nested and _wrapper(child):
            units += [(f"{name}.{inner}", grandchild) for inner, grandchild in child.named_children()]
        else:
            units.append((name, child))
    return units


def _sublayer(block: nn.Module, unit: str) -> bool:
    """Whether a traced unit that reads a norm's output is a sublayer the norm can be a pre-norm of: a
    child of the block, or inside a wrapper a module with parts of its own (attention, MLP). A bare
    linear layer inside a wrapper computes the wrapper's own gates (hyper-connections mix residual
    streams with weights computed from a normalised copy of them): no sublayer."""
    return "." not in unit or any(True for _ in block.get_submodule(unit).children())


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
    failure: str | None = None  # why the traced forwards stopped before this block finished, if they did


# The largest model traced as a real CPU instance (random weights, fp32) when the meta device cannot
# run its forward: 100M parameters take 400 MB. A larger one is traced from a copy of its config with
# narrower layers, when such a copy builds the same blocks.
REAL_TRACE_PARAMETERS = 100_000_000


def trace_blocks(model: nn.Module, layers_path: str, nested: bool = False) -> list[_BlockTrace]:
    """One forward of the model (meta device is enough) with every block's data flow traced.

    A sublayer that cannot run on the meta device (data-dependent MoE routing) is replaced, for that
    call, by a stand-in that returns a tensor shaped like its input and carrying its input's labels.
    Some models check the attention mask's values and others the ids' (packing, padding), which meta
    tensors cannot answer: the forward is tried without a mask, then with one. Where no forward on the
    meta device reaches every block (a sublayer whose output the block unpacks, so no stand-in fits),
    a real instance on the CPU is traced instead: the model itself rebuilt with random weights when it
    is small, else a narrowed copy of its config (see ``_real_twin``).
    """
    # The trace runs on a bf16 meta twin: no memory, no compute, the caller's model untouched (and the
    # meta kernels of grouped expert matmuls accept bf16 only).
    if _device(model).type == "meta":
        twin = copy.deepcopy(model).to(torch.bfloat16)
        _traceable_attention(twin.config)
    else:
        with torch.device("meta"):  # from a copy of the config, which building may write to
            twin = type(model)._from_config(_traceable_attention(copy.deepcopy(model.config))).to(torch.bfloat16)
    traces = _trace_all(twin.eval(), layers_path, nested)
    if all(trace.finished for trace in traces) or not any(trace.failure for trace in traces):
        return traces
    real, why_not = _real_twin(model, layers_path)
    if real is None:
        for trace in traces:
            if trace.failure:
                trace.failure += f"; no CPU instance could be traced instead: {why_not}"
        return traces
    real_traces = _trace_all(real, layers_path, nested)
    for trace in real_traces:
        if trace.failure:
            trace.failure = f"on a CPU instance as on the meta device: {trace.failure}"
    return real_traces


def _traceable_attention(config):
    """``config`` with sdpa attention where it names a kernel a trace cannot run: flex attention compiles
    its block mask and has no meta kernel, flash-attention needs a GPU. Which attention kernel runs says
    nothing about where the norms' outputs go. A model loaded with flex attention for packed training is
    converted on load (``lns_convert``) through this twin."""
    if getattr(config, "_attn_implementation", None) not in (None, "eager", "sdpa"):
        config._attn_implementation = "sdpa"
    return config


def _forward_inputs(model: nn.Module, with_mask: bool, cross_states: bool) -> dict:
    """Token ids for a forward (and what the forward needs beside them to reach the decoder blocks).

    Encoder-decoder models get the same ids on the decoder side, and the cache is turned off where the
    forward takes ``use_cache`` (some families' caches cannot be built from their own config).
    ``cross_states`` adds vision states for decoders whose cross-attention blocks run only with them
    (Mllama): a text-only forward skips those blocks.
    """
    device = _device(model)
    ids = torch.ones(1, 4, dtype=torch.long, device=device)
    accepted = inspect.signature(model.forward).parameters
    inputs = {"input_ids": ids}
    if "decoder_input_ids" in accepted:
        inputs["decoder_input_ids"] = ids
    if "use_cache" in accepted:
        inputs["use_cache"] = False
    if with_mask and ("attention_mask" in accepted
                      or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in accepted.values())):
        inputs["attention_mask"] = torch.ones_like(ids)
    if cross_states and "cross_attention_states" in accepted:
        text = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        width = getattr(text, "hidden_size", None)
        if isinstance(width, int):
            dtype = next(model.parameters()).dtype
            inputs["cross_attention_states"] = torch.ones(1, 4, width, dtype=dtype, device=device)
    return inputs


def _trace_all(model: nn.Module, layers_path: str, nested: bool) -> list[_BlockTrace]:
    """The traces of the first forward that reaches every block, else of the one that reached most."""
    blocks = model.get_submodule(layers_path)
    best: list[_BlockTrace] | None = None
    for with_mask, cross_states in ((False, False), (True, False), (False, True), (True, True)):
        if cross_states and "cross_attention_states" not in inspect.signature(model.forward).parameters:
            break
        traces = _trace_once(model, blocks, _forward_inputs(model, with_mask, cross_states), nested)
        if best is None or sum(t.finished for t in traces) > sum(t.finished for t in best):
            best = traces
        if all(trace.finished for trace in traces):
            break
    return best


def _trace_once(model: nn.Module, blocks: nn.ModuleList, inputs: dict, nested: bool = False) -> list[_BlockTrace]:
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
        for name, child in _units(block, nested):
            if isinstance(child, _PASS_THROUGH):
                continue  # dropout and identity carry data (see _CARRYING); they are not sublayers
            if _looks_like_norm(name.rsplit(".", 1)[-1], child):
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
        for trace in traces:
            if not trace.finished:
                trace.failure = f"the forward failed with {type(exc).__name__}: {first_line(exc)}"
    finally:
        for handle in handles:
            handle.remove()
        for module in patched:
            del module.forward
    return traces


def _parameter_count(model: nn.Module) -> int:
    return sum(parameter.numel() for parameter in model.parameters())


def _block_structure(model: nn.Module, layers_path: str) -> list:
    """Per block: its class and every submodule's name and class (what the trace classifies by)."""
    blocks = model.get_submodule(layers_path)
    return [(type(block).__name__, [(name, type(module).__name__) for name, module in block.named_modules()])
            for block in blocks]


def _real_twin(model: nn.Module, layers_path: str):
    """``(a real fp32 CPU instance of the model's class in eval mode, None)``, or ``(None, why not)``.

    Random weights: the trace follows where data goes, not its values. The model's own config is used
    where it has at most ``REAL_TRACE_PARAMETERS`` parameters, else a copy narrowed by ``_narrowed``;
    either way the instance must have the very blocks of the model (same classes, same submodules by
    name), or its trace would describe another model and it is not used.
    """
    config = getattr(model, "config", None)
    if config is None or not hasattr(type(model), "_from_config") or not hasattr(config, "to_dict"):
        return None, "the model has no config to build one from"
    config = _traceable_attention(copy.deepcopy(config))
    if _parameter_count(model) > REAL_TRACE_PARAMETERS:
        config = _narrowed(config)
        if config is None:
            return None, (f"the model has over {REAL_TRACE_PARAMETERS:,} parameters and its config has no widths "
                          "to narrow")
        try:
            with torch.device("meta"):
                count = _parameter_count(type(model)._from_config(copy.deepcopy(config)))
        except Exception as exc:  # a narrowed config its own code rejects
            return None, f"a narrowed copy of its config does not build ({first_line(exc)})"
        if count > REAL_TRACE_PARAMETERS:
            return None, f"even narrowed, the model has {count:,} parameters (over {REAL_TRACE_PARAMETERS:,})"
    try:
        with torch.device("cpu"):
            real = type(model)._from_config(config, dtype=torch.float32)
    except Exception as exc:  # the model's own constructor failing on a narrowed or CPU build
        return None, f"building it on the CPU failed ({first_line(exc)})"
    try:
        same = _block_structure(real, layers_path) == _block_structure(model, layers_path)
    except AttributeError:
        same = False
    if not same:
        return None, "the CPU instance built from its config has other blocks than the model"
    return real.float().eval(), None


# Config keys that set a width (scaled together, so that each head keeps its size) and counts of
# experts (cut to a few: tracing needs every kind of path, not every copy of it).
_WIDTH_KEYS = ("hidden_size", "d_model", "n_embd", "intermediate_size", "moe_intermediate_size", "ffn_hidden_size",
               "shared_expert_intermediate_size", "ffn_dim", "n_inner", "d_ff", "num_attention_heads",
               "num_key_value_heads", "n_head", "num_heads", "n_heads", "num_kv_heads")
_EXPERT_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")
_TOP_K_KEYS = ("num_experts_per_tok", "top_k", "moe_top_k", "num_experts_per_token")
_NARROW_VOCABULARY = 1024


def _narrowed(config):
    """A copy of ``config`` whose widths are divided by the largest power of two (up to 64) that
    divides every width and head count of each (sub-)config, with at most 4 experts per layer and a
    smaller vocabulary (never below a token id the config names); None where nothing changes.

    Nothing here has to be right for a given family: the caller uses the result only if it builds,
    is small enough and has the model's very blocks.
    """
    changed = False
    seen = set()

    def narrow(node) -> None:
        nonlocal changed
        if id(node) in seen:
            return
        seen.add(id(node))
        values = vars(node)
        widths = {key: values[key] for key in _WIDTH_KEYS if isinstance(values.get(key), int) and values[key] > 0}
        if widths:
            factor = 64
            while factor > 1 and any(value % factor or value // factor < 1 for value in widths.values()):
                factor //= 2
            if factor > 1:
                for key, value in widths.items():
                    setattr(node, key, value // factor)
                changed = True
        experts = [key for key in _EXPERT_KEYS if isinstance(values.get(key), int) and values[key] > 4]
        for key in experts:
            setattr(node, key, 4)
            changed = True
        if experts:
            for key in _TOP_K_KEYS:
                if isinstance(values.get(key), int) and values[key] > 2:
                    setattr(node, key, 2)
        vocabulary = values.get("vocab_size")
        if isinstance(vocabulary, int) and vocabulary > _NARROW_VOCABULARY:
            named = [value for key, value in values.items()
                     if key.endswith(("_id", "_index")) and isinstance(value, int)]
            smallest = max([_NARROW_VOCABULARY - 1, *named]) + 1
            if smallest < vocabulary:
                node.vocab_size = smallest
                changed = True
        for value in list(values.values()):
            if hasattr(value, "to_dict") and hasattr(value, "model_type"):  # a sub-config
                narrow(value)

    narrow(config)
    return config if changed else None


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


def classify_block_norms(block: nn.Module, trace: _BlockTrace, layers_path: str, index: int,
                         nested: bool = False) -> list[str]:
    """The pre-sublayer norms of one traced block, in call order; refuses what it cannot classify.

    With ``nested`` (norms inside wrappers), only the block's children and the wrappers' parts that
    have parts of their own count as sublayers (``_sublayer``).
    """
    where = f"block {index} ({type(block).__name__}) of '{layers_path}'"
    if not trace.finished:
        if trace.failure:
            raise LNSError(f"{where} could not be traced, so its pre-sublayer norms could not be established: "
                           f"{trace.failure}; state the norms with --norms")
        raise LNSError(f"{where} did not run in a text-only forward (it needs other inputs, such as images), so its "
                       "pre-sublayer norms could not be established; state the norms with --norms")
    pre = []
    for name, input_labels in trace.norm_inputs.items():
        reads_residual = ("residual", index) in input_labels
        consumers = trace.consumed.get(name, set())
        if nested:
            consumers = {unit for unit in consumers if _sublayer(block, unit)}
        if consumers:
            if not reads_residual:
                raise LNSError(f"{where}: norm '{name}' feeds a sublayer but does not read the residual stream; cannot classify it")
            pre.append(name)
        elif reads_residual and trace.consumed.get(name):  # nested: read only by bare layers inside wrappers
            raise LNSError(
                f"{where}: norm '{name}' normalises the residual stream, and what reads its output "
                f"({', '.join(sorted(trace.consumed[name]))}) is no attention or MLP module (a post-norm design, "
                "hyper-connections, or a sublayer split over several modules): its pre-sublayer norms cannot be established"
            )
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
    """Per block, the names of the norms whose outputs feed the block's sublayers, in call order.

    Where no block shows one among its children but blocks keep their norms inside a wrapper beside a
    sublayer (DBRX: ``norm_attn_norm`` holds norm, attention, norm), the wrapper's children are traced
    as the block's own and the norms are named by their path (``norm_attn_norm.norm_1``).
    """
    blocks = model.get_submodule(layers_path)
    traces = trace_blocks(model, layers_path)
    per_block = [classify_block_norms(block, trace, layers_path, i) for i, (block, trace) in enumerate(zip(blocks, traces))]
    if any(per_block) or not any(_wrapper(child) for block in blocks for child in block.children()):
        return per_block
    traces = trace_blocks(model, layers_path, nested=True)
    return [classify_block_norms(block, trace, layers_path, i, nested=True)
            for i, (block, trace) in enumerate(zip(blocks, traces))]


def _first_block_lacks_only_identities(block_list, per_block: list[list[str]]) -> list[str] | None:
    """The norms of blocks 2..L where block 1 differs from them only by an nn.Identity in place of some
    of those norms (ModernBERT's first block has no attention norm), else None.

    Block 1's LNS scale is 1 at every alpha, so scaling its identity is exact, and there is nothing
    to fold into it.
    """
    if len(per_block) < 2:
        return None
    rest = {tuple(names) for names in per_block[1:]}
    if len(rest) != 1:
        return None
    norms = list(rest.pop())
    missing = [name for name in norms if name not in per_block[0]]
    if not missing or [name for name in norms if name in per_block[0]] != per_block[0]:
        return None
    for name in missing:
        try:
            module = block_list[0].get_submodule(name)
        except AttributeError:
            return None
        if not isinstance(module, nn.Identity):
            return None
    return norms


def prove_norms(arch: Architecture, model: nn.Module) -> Architecture:
    """``arch`` with the norm form and fold rule proven on this model's own norm classes.

    Every block must have every norm; one form (and one fold rule) serves all of them, so where the
    classes disagree the output form, which is exact for any norm, is used (and folding is refused).
    """
    try:
        blocks = resolve_layers(model, arch.layers)
    except AttributeError:
        raise LNSError(f"'{arch.layers}' is not a module of this {model.config.model_type} model") from None
    modules = []
    for index, block in enumerate(blocks):
        for name in arch.norms:
            try:
                module = block.get_submodule(name)
            except AttributeError:
                raise LNSError(
                    f"block {index} ({type(block).__name__}) of '{arch.layers}' has no norm '{name}'; "
                    "state the norms of every block with --norms"
                ) from None
            if index == 0 and isinstance(module, nn.Identity):  # scale 1 at any alpha: nothing to prove or fold
                continue
            modules.append(module)
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
            if name not in pre and not _is_identity_of_the_first_block(block, index, name):
                raise LNSError(
                    f"'{name}' is not a pre-sublayer norm of block {index} ({type(block).__name__}): its data flow shows "
                    f"{', '.join(pre) or 'none'}. Post-sublayer, q/k and final norms are never scaled; pass --force to "
                    "scale it anyway"
                )


def _is_identity_of_the_first_block(block: nn.Module, index: int, name: str) -> bool:
    try:
        return index == 0 and isinstance(block.get_submodule(name), nn.Identity)
    except AttributeError:
        return False


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
        shared = _first_block_lacks_only_identities(block_list, per_block)
        if shared is not None:
            distinct = {tuple(shared)}
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
