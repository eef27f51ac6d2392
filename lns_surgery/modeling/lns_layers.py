"""LayerNorm Scaling (Sun et al., "The Curse of Depth in Large Language Models", 2025).

Block l (counted from 1) of a Pre-LN decoder computes

    h = x + Attn(Norm_attn(x) / sqrt(l))
    y = h + FFN(Norm_ffn(h) / sqrt(l))

This file ships verbatim inside every LNS checkpoint (next to ``configuration_lns.py`` and
``modeling_lns.py``) and is also what lns-surgery itself runs, so it imports only torch and
transformers and keeps no state outside the modules it touches, apart from a cache of the proofs
about norm classes.

How the scale is applied: each targeted norm module keeps its class's parameters (same names,
shapes and state-dict keys) and is given a subclass whose forward multiplies the norm's *effective
weight* by the scale c (``c * w``, ``c * (1 + w)`` for Gemma, ``c * w`` and ``c * b`` for LayerNorm).
That is the same function, with the same gradient, as scaling the norm's output, but it costs a
multiply over a hidden-size vector instead of a pass over the activations. Such a weight form is
used only once a CPU copy of that norm class has shown it equals ``c * stock_forward(x)`` (fp32,
random weights and inputs, milliseconds); any other norm, including classes nobody has seen, gets
the ``output`` form: its own stock forward followed by a multiply, exact by construction.

Under ``torch.fx`` symbolic tracing the weight forms record the stock forward followed by the
multiply instead. A runtime that matches norms by their traced structure and swaps in a kernel of
its own (vLLM's Transformers backend turns any ``x * rsqrt(mean(x**2) + eps) * <anything>`` into
its fused RMSNorm, loaded with the stored, unscaled weight) then sees compute after the norm and
keeps this module, whose eager forward is the weight form.

The scale is a plain Python float recomputed from the layer index whenever the model is built, so
nothing can wipe it: meta-device init, ``to_empty``, ``.to(dtype)``, ``deepcopy`` and PEFT's module
copies all keep it.
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil

import torch
import torch.nn.functional as F
from torch import nn

SCHEMA_VERSION = 2
RULE = "1/sqrt(l)"
CODE_FILES = ("lns_layers.py", "configuration_lns.py", "modeling_lns.py")
WEIGHT_FORMS = ("rmsnorm", "gemma_rmsnorm", "layernorm")  # tried in this order
NORM_KINDS = (*WEIGHT_FORMS, "output")
_LEGACY_KINDS = {"layernorm_no_affine": "output"}  # schema 1 name of the output form


def layer_scale(layer_index: int, alpha: float = 1.0) -> float:
    """Scale of the norms of the block at 0-based ``layer_index``: 1/sqrt(index + 1) at alpha=1.

    ``alpha`` moves it linearly from 1 (alpha=0, the original function) to the full LNS scale (alpha=1);
    training ramps use it to start healing from the model's original function.
    """
    full = 1.0 / math.sqrt(layer_index + 1)
    return 1.0 + alpha * (full - 1.0)


# --- norm forwards with the scale inside the effective weight -----------------------------------


def _symbolic(tensor) -> bool:
    return isinstance(tensor, torch.fx.Proxy)


def _stock_forward_then_scale(self, x):
    # What a symbolic trace records for every weight form: the stock norm, then the multiply. A
    # pattern matcher that swaps the stock norm for a kernel of its own (fed the stored weight) must
    # keep the multiply after it, or leave this module alone; with the scale inside the weight, one
    # that does not check where its weight operand comes from drops the scale silently.
    return super(type(self), self).forward(x) * self.lns_scale


def _rmsnorm_forward(self, hidden_states):
    # Llama's RMSNorm (and its copies in Mistral, Qwen, Phi-3, Granite, DeepSeek, ...), weight c * w.
    if _symbolic(hidden_states):
        return _stock_forward_then_scale(self, hidden_states)
    input_dtype = hidden_states.dtype
    hidden_states = hidden_states.to(torch.float32)
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    eps = self.variance_epsilon if hasattr(self, "variance_epsilon") else self.eps
    hidden_states = hidden_states * torch.rsqrt(variance + eps)
    return (self.weight * self.lns_scale) * hidden_states.to(input_dtype)


def _gemma_rmsnorm_forward(self, x):
    # Gemma computes x_hat * (1 + w) in fp32: the effective weight is c * (1 + w), also in fp32.
    if _symbolic(x):
        return _stock_forward_then_scale(self, x)
    output = x.float()
    output = output * torch.rsqrt(output.pow(2).mean(-1, keepdim=True) + self.eps)
    output = output * ((1.0 + self.weight.float()) * self.lns_scale)
    return output.type_as(x)


def _layernorm_forward(self, input):
    # nn.LayerNorm (GPT-2, GPT-NeoX, ...): c * (w * x_hat + b) = (c * w) * x_hat + c * b.
    if _symbolic(input):
        return _stock_forward_then_scale(self, input)
    weight = self.weight * self.lns_scale if self.weight is not None else None
    bias = self.bias * self.lns_scale if self.bias is not None else None
    return F.layer_norm(input, self.normalized_shape, weight, bias, self.eps)


def _scaled_output_forward(self, *args, **kwargs):
    # Any norm (one without parameters, like OLMo's, or one whose math no weight form matches):
    # the stock forward, then the scale.
    return super(type(self), self).forward(*args, **kwargs) * self.lns_scale


_FORWARDS = {
    "rmsnorm": _rmsnorm_forward,
    "gemma_rmsnorm": _gemma_rmsnorm_forward,
    "layernorm": _layernorm_forward,
    "output": _scaled_output_forward,
}


def canonical_kind(kind: str) -> str:
    return _LEGACY_KINDS.get(kind, kind)


# --- proving a weight form on a CPU copy of one norm ---------------------------------------------

PROBE_SCALE = 0.37  # any value away from 1 and 0
PROBE_TOLERANCE = dict(rtol=1e-5, atol=1e-6)


def stock_class(module: nn.Module) -> type:
    cls = type(module)
    return cls.__mro__[1] if hasattr(cls, "lns_kind") else cls


def norm_width(module: nn.Module) -> int | None:
    """The size of the last dimension the norm works on, from its parameters or its shape."""
    for tensor in module.parameters(recurse=False):
        if tensor.dim() >= 1:
            return int(tensor.shape[-1])
    shape = getattr(module, "normalized_shape", None)
    if shape:
        return int(tuple(shape)[-1]) if not isinstance(shape, int) else shape
    return None


def cpu_probe(module: nn.Module, seed: int = 0) -> nn.Module:
    """A stock-class fp32 CPU copy of ``module`` with random parameters: never the model's weights."""
    with torch.device("cpu"):
        probe = copy.deepcopy(module)
        probe.__class__ = stock_class(module)
        if any(t.is_meta for t in probe.parameters()) or any(t.is_meta for t in probe.buffers()):
            probe = probe.to_empty(device="cpu")
        probe = probe.to(device="cpu", dtype=torch.float32)
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for tensor in probe.parameters(recurse=False):
                tensor.copy_(0.5 + torch.rand(tensor.shape, generator=generator))
    return probe


def probe_input(width: int, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return 0.3 + 2.0 * torch.randn(2, 5, width, generator=generator, dtype=torch.float32)


def _stock_output(probe: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return type(probe).forward(probe, x)


def weight_form_is_exact(module: nn.Module, kind: str) -> bool:
    """Whether the weight form ``kind`` computes ``c * stock_forward(x)`` for this norm's class.

    Decided on a CPU copy with random weights (cached per class and width); any error means no.
    """
    if kind == "output":
        return True
    width = norm_width(module)
    if width is None or kind not in _FORWARDS:
        return False
    key = (stock_class(module), kind, width, probe_attributes(module))
    if key not in _PROVEN:
        _PROVEN[key] = _prove(module, kind, width)
    return _PROVEN[key]


_PROVEN: dict = {}


def probe_attributes(module: nn.Module) -> tuple:
    """A norm's plain attributes (eps, flags such as with_scale), which can change its math: part of
    every cache key of a proof about its class."""
    return tuple(sorted((k, repr(v)) for k, v in vars(module).items()
                        if isinstance(v, (bool, int, float, str, tuple)) and k not in {"training", "lns_scale"}))


def _prove(module: nn.Module, kind: str, width: int) -> bool:
    try:
        probe = cpu_probe(module)
        x = probe_input(width)
        expected = PROBE_SCALE * _stock_output(probe, x)
        probe.lns_scale = PROBE_SCALE
        with torch.no_grad():
            actual = _FORWARDS[kind](probe, x)
        return probe_matches(actual, expected)
    except Exception:  # a form that does not even run on this class is not this class's math
        return False


def probe_matches(actual, expected) -> bool:
    """Whether a probe's output equals the scaled stock output (fp32, tight tolerance)."""
    return bool(actual.shape == expected.shape and torch.allclose(actual, expected, **PROBE_TOLERANCE))


def exact_kind(module: nn.Module, preferred: str | None = None) -> str:
    """The form to scale this norm with: ``preferred`` (or the first weight form) once proven, else ``output``."""
    candidates = (canonical_kind(preferred),) if preferred else WEIGHT_FORMS
    for kind in candidates:
        if weight_form_is_exact(module, kind):
            return kind
    return "output"

_SCALED_CLASSES: dict = {}


class _NotKernelized:
    """The ``kernel_layer_name`` of every scaled norm class: reading it raises AttributeError.

    The ``kernels`` library (``kernelize``, and transformers' ``use_kernels``, which is on by default
    when ``kernels`` is installed) replaces the forward of every module whose class has a
    ``kernel_layer_name`` with a hub kernel for that name. The stock norm classes carry ``"RMSNorm"``;
    inherited, it would swap the scaled forward for a kernel that reads the stored, unscaled weight, and
    the model would compute the stock function without a word. With the name unreadable, ``hasattr``
    is False on the class and its instances, so kernelize (every version) leaves these norms alone and
    kernelizes the rest of the model.
    """

    def __get__(self, instance, owner=None):
        raise AttributeError("kernel_layer_name")


def _drop_kernel_forward(module: nn.Module) -> None:
    # kernelize installs a kernel as an instance attribute ``forward`` (and records its repository in
    # ``_kernel_repo``); on a norm that was kernelized before it was scaled, that attribute would bypass
    # the scaled class's forward.
    if "_kernel_repo" in module.__dict__:
        module.__dict__.pop("forward", None)
        module.__dict__.pop("_kernel_repo", None)


def _extra_repr(self):
    base = super(type(self), self).extra_repr()
    return f"{base}, lns_scale={self.lns_scale:.6g}" if base else f"lns_scale={self.lns_scale:.6g}"


def scaled_norm_class(base: type, kind: str) -> type:
    """The subclass of ``base`` whose forward applies ``self.lns_scale`` (one class per base and kind).

    It keeps the base's name inside its own (``LNSLlamaRMSNorm``), so ``isinstance`` checks and
    transformers' name-based weight initialisation treat it exactly like the stock norm. Hub kernels
    that replace norms by their ``kernel_layer_name`` do not (see ``_NotKernelized``).
    """
    kind = canonical_kind(kind)
    if kind not in _FORWARDS:
        raise ValueError(f"unknown norm kind {kind!r}; expected one of {', '.join(NORM_KINDS)}")
    key = (base, kind)
    if key not in _SCALED_CLASSES:
        name = f"LNS{base.__name__}"
        cls = type(name, (base,), {"forward": _FORWARDS[kind], "extra_repr": _extra_repr, "lns_kind": kind,
                                   "kernel_layer_name": _NotKernelized()})
        cls.__module__ = __name__
        cls.__qualname__ = name
        globals().setdefault(name, cls)  # picklable by name
        _SCALED_CLASSES[key] = cls
    return _SCALED_CLASSES[key]


def is_scaled_norm(module: nn.Module) -> bool:
    # A class attribute rather than a registry lookup: norms scaled by another copy of this file
    # (a checkpoint's remote code) must be recognised too, or they could be scaled twice.
    return hasattr(type(module), "lns_kind")


def resolve_layers(model: nn.Module, layers_path: str) -> nn.ModuleList:
    """The decoder's block list at ``layers_path`` (e.g. ``model.layers``), also on the bare base model."""
    try:
        return model.get_submodule(layers_path)
    except AttributeError:
        prefix = getattr(model, "base_model_prefix", "")
        head, _, rest = layers_path.partition(".")
        if head == prefix and rest:
            return model.get_submodule(rest)
        raise


def apply_scaling(model: nn.Module, lns: dict) -> nn.Module:
    """Give each targeted norm its scaled subclass and the scale for ``lns['alpha']``. Idempotent.

    Norms that PEFT has wrapped (``modules_to_save`` keeps an original and a trained copy) are found
    inside their wrapper, and every copy gets the scale. The recorded ``norm_kind`` is used only where
    it is proven for the installed norm class; otherwise the norm's output is scaled.
    """
    layers = resolve_layers(model, lns["layers"])
    alpha = float(lns.get("alpha", 1.0))
    for index, layer in enumerate(layers):
        for norm_name in lns["norms"]:
            module = layer.get_submodule(norm_name)
            norms = [m for m in module.modules() if is_scaled_norm(m)]
            if not norms:
                kind = exact_kind(module, lns["norm_kind"])
                module.__class__ = scaled_norm_class(type(module), kind)
                _drop_kernel_forward(module)
                norms = [module]
            for norm in norms:
                norm.lns_scale = layer_scale(index, alpha)
    return model


def set_alpha(model: nn.Module, alpha: float) -> None:
    """Move every scale to ``layer_scale(l, alpha)`` and record alpha in the config (ramped surgery)."""
    if hasattr(model, "get_base_model"):  # a PEFT wrapper
        model = model.get_base_model()
    lns = dict(model.config.lns)
    lns["alpha"] = float(alpha)
    model.config.lns = lns
    apply_scaling(model, lns)


def share_weight_conversions(base_model_type: str, base_class_names=()) -> None:
    """Let LNS checkpoints use the base family's checkpoint key conversions.

    transformers 5 renames some weights between the files and the modules (Mixtral's per-expert
    ``w1/w2/w3`` <-> fused ``gate_up_proj``, GPT-NeoX's ``embed_out`` <-> ``lm_head``), looked up by
    ``model_type`` and by class name; without this, such checkpoints would load with freshly
    initialised weights in place of the real ones.
    """
    try:
        from transformers.conversion_mapping import (
            get_checkpoint_conversion_mapping,
            register_checkpoint_conversion_mapping,
        )
    except ImportError:  # a transformers without checkpoint conversions needs none
        return
    pairs = [(lns_model_type(base_model_type), base_model_type)]
    pairs += [(lns_class_name(name), name.rsplit(".", 1)[-1]) for name in base_class_names]
    for lns_key, base_key in pairs:
        mapping = get_checkpoint_conversion_mapping(base_key)
        if mapping is not None:
            register_checkpoint_conversion_mapping(lns_key, mapping, overwrite=True)


def share_peft_targets(base_model_type: str) -> None:
    """Let PEFT choose the same modules to adapt on an LNS model as on the stock one.

    PEFT looks tables up by ``config.model_type``: each method's default ``target_modules`` and, for
    transformers 5's fused mixture-of-experts layers, what ``"all-linear"`` means (the experts and the
    router are no longer ``nn.Linear``; PEFT's copy of transformers' conversion-pattern table says
    which parameters stand for them). An unknown type gets no default and attention-only LoRA from
    "all-linear", silently. ``lns_<base>`` gets ``<base>``'s entry in every such table that has one,
    so a family PEFT does not map stays unmapped, exactly as the stock model. PEFT is imported here,
    if it is installed at all, because its tables are filled when it is imported; the model_type
    itself stays ``lns_<base>`` (reusing the base's would let the checkpoint load as the stock model).
    """
    lns_type = lns_model_type(base_model_type)
    try:  # imports in a try block are optional for transformers' remote-code import check
        from peft.utils import constants
    except Exception:  # no PEFT, or one that does not import with this transformers: nothing to tell it
        return
    tables = [table for name, table in vars(constants).items()
              if name.startswith("TRANSFORMERS_MODELS_TO_") and isinstance(table, dict)]
    try:
        from peft.utils import transformers_weight_conversion
    except Exception:  # transformers 4, or a PEFT without fused-expert support
        pass
    else:
        pattern = getattr(transformers_weight_conversion, "_MODEL_TO_CONVERSION_PATTERN", None)
        if isinstance(pattern, dict):
            tables.append(pattern)
    for table in tables:
        if base_model_type in table:
            table[lns_type] = table[base_model_type]


# --- the model classes --------------------------------------------------------------------------


class LayerNormScalingMixin:
    """Put before a stock transformers model class: builds the stock model, then scales its norms.

    Saving writes this file and the two small files that define the LNS classes next to the
    weights, with an ``auto_map`` for every Auto class, so the folder loads anywhere with
    ``trust_remote_code=True``.
    """

    def __init__(self, config, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        apply_scaling(self, config.lns)

    def set_lns_alpha(self, alpha: float) -> None:
        set_alpha(self, alpha)

    @classmethod
    def is_custom_code(cls) -> bool:
        # transformers skips initialising a module of custom code whose own tensors are all loaded,
        # because remote code may write weights in place. These classes initialise with the stock
        # class's own _init_weights, and the shortcut would leave buffers that a parent module fills
        # (Falcon-H1's mup_vector, set from FalconH1Model) as uninitialised memory.
        return False

    def save_pretrained(self, save_directory, *args, **kwargs):
        result = super().save_pretrained(save_directory, *args, **kwargs)
        if kwargs.get("is_main_process", True):
            write_custom_code(save_directory, self.config.lns)
        return result


# --- the code that ships with a checkpoint ------------------------------------------------------

_CONFIGURATION_TEMPLATE = '''"""Configuration of a LayerNorm Scaling (LNS) checkpoint of a `{base_model_type}` model.

Written by lns-surgery. It is the stock {config_class} with its own `model_type`, so that this
checkpoint can never load as the stock model (which would silently drop the depth scaling).
"""

{config_import}


class {lns_config_class}({config_class}):
    model_type = "{lns_model_type}"
'''

_MODELING_HEADER = '''"""LayerNorm Scaling (LNS) model classes for a `{base_model_type}` checkpoint.

Written by lns-surgery. Each class is the stock transformers class with the norms before attention
and before the MLP of block l scaled by 1/sqrt(l) (see lns_layers.py); weights and their names are
the stock ones.
"""

{imports}

from .configuration_lns import {lns_config_class}
from .lns_layers import LayerNormScalingMixin, share_peft_targets, share_weight_conversions

share_weight_conversions("{base_model_type}", {base_class_names!r})
share_peft_targets("{base_model_type}")
'''

_MODELING_CLASS = '''

class {lns_class}(LayerNormScalingMixin, {base_class}):
    config_class = {lns_config_class}
'''


def lns_model_type(base_model_type: str) -> str:
    return f"lns_{base_model_type}"


def lns_class_name(base_class_name: str) -> str:
    return f"LNS{base_class_name.rsplit('.', 1)[-1]}"


def _imports(names) -> str:
    """Import lines for stock class names: ``LlamaModel`` comes from transformers, while
    ``modeling_foo.FooModel`` comes from the base checkpoint's own code file beside this one."""
    from_transformers = sorted({name for name in names if "." not in name})
    lines = [f"from transformers import {', '.join(from_transformers)}"] if from_transformers else []
    local: dict = {}
    for name in names:
        if "." in name:
            module, class_name = name.rsplit(".", 1)
            local.setdefault(module, set()).add(class_name)
    lines += [f"from .{module} import {', '.join(sorted(classes))}" for module, classes in sorted(local.items())]
    return "\n".join(lines)


def render_code(lns: dict) -> dict:
    """Source text of ``configuration_lns.py`` and ``modeling_lns.py`` for the ``lns`` config block."""
    classes = lns["base_classes"]
    config_class = classes["config"]
    fields = {
        "base_model_type": lns["base_model_type"],
        "config_class": config_class.rsplit(".", 1)[-1],
        "config_import": _imports([config_class]),
        "lns_config_class": lns_class_name(config_class),
        "lns_model_type": lns_model_type(lns["base_model_type"]),
    }
    model_classes = list(dict.fromkeys(name for auto, name in classes.items() if auto != "config"))
    modeling = _MODELING_HEADER.format(imports=_imports(model_classes), base_class_names=model_classes, **fields)
    for base_class in model_classes:
        modeling += _MODELING_CLASS.format(
            lns_class=lns_class_name(base_class), base_class=base_class.rsplit(".", 1)[-1], **fields
        )
    return {"configuration_lns.py": _CONFIGURATION_TEMPLATE.format(**fields), "modeling_lns.py": modeling}


def auto_map(lns: dict) -> dict:
    classes = lns["base_classes"]
    mapping = {"AutoConfig": f"configuration_lns.{lns_class_name(classes['config'])}"}
    for auto, name in classes.items():
        if auto != "config":
            mapping[auto] = f"modeling_lns.{lns_class_name(name)}"
    return mapping


def write_custom_code(save_directory, lns: dict) -> None:
    """Write the three code files into ``save_directory`` and point ``config.json``'s auto_map at them."""
    save_directory = os.fspath(save_directory)
    here = os.path.abspath(__file__)
    target = os.path.join(save_directory, "lns_layers.py")
    if os.path.abspath(target) != here:
        shutil.copyfile(here, target)
    for name, source in render_code(lns).items():
        with open(os.path.join(save_directory, name), "w", encoding="utf-8") as handle:
            handle.write(source)
    config_path = os.path.join(save_directory, "config.json")
    if os.path.exists(config_path):
        with open(config_path, encoding="utf-8") as handle:
            config = json.load(handle)
        config["auto_map"] = auto_map(lns)
        with open(config_path, "w", encoding="utf-8") as handle:
            json.dump(config, handle, indent=2, sort_keys=True)
            handle.write("\n")
