"""Where a training run's model comes from: an LNS checkpoint, a stock checkpoint converted on load,
or a from-scratch model with the paper's shapes (``lns-surgery init``)."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from lns_surgery.core import outputs
from lns_surgery.core.errors import LNSError, first_line
from lns_surgery.core.sources import resolve_builtin

logger = logging.getLogger(__name__)

# The LLaMA shapes of the paper's from-scratch runs (Sun et al. 2025, after GaLore's configs): RMSNorm
# eps 1e-6, SwiGLU, untied embeddings, T5's 32000-token vocabulary.
PRESETS = {
    "llama-130m": {"num_hidden_layers": 12, "hidden_size": 768, "intermediate_size": 2048, "num_attention_heads": 12},
    "llama-250m": {"num_hidden_layers": 24, "hidden_size": 768, "intermediate_size": 2560, "num_attention_heads": 16},
    "llama-350m": {"num_hidden_layers": 24, "hidden_size": 1024, "intermediate_size": 2736, "num_attention_heads": 16},
    "llama-1b": {"num_hidden_layers": 24, "hidden_size": 2048, "intermediate_size": 5461, "num_attention_heads": 32},
}
_PRESET_COMMON = {
    "vocab_size": 32000,
    "max_position_embeddings": 1024,
    "rms_norm_eps": 1e-6,
    "hidden_act": "silu",
    "tie_word_embeddings": False,
    "initializer_range": 0.02,  # plain normal init: the paper found depth-scaled init shrinks LNS's gain
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
}


def preset_config(preset: str | None = None, overrides: dict | None = None, tokenizer=None):
    """A ``LlamaConfig`` for ``preset`` (or from ``overrides`` alone), sized to ``tokenizer`` when given."""
    from transformers import LlamaConfig

    if preset is not None and preset not in PRESETS:
        raise LNSError(f"unknown preset '{preset}'; available: {', '.join(PRESETS)}")
    values = {**_PRESET_COMMON, **(PRESETS[preset] if preset else {}), **(overrides or {})}
    values.pop("model_type", None)
    if tokenizer is not None:
        values["vocab_size"] = len(tokenizer)
        for name in ("pad", "bos", "eos"):
            token_id = getattr(tokenizer, f"{name}_token_id")
            values[f"{name}_token_id"] = token_id
    try:
        return LlamaConfig(**values)
    except (TypeError, ValueError) as exc:
        raise LNSError(f"invalid model config: {first_line(exc)}") from None


def build_scratch_model(config, lns: bool = True, seed: int = 0):
    """A freshly initialised causal LM (normal init, std ``config.initializer_range``), with LNS unless ``lns=False``."""
    import torch
    from transformers import AutoModelForCausalLM

    from lns_surgery.conversion import apply_layernorm_scaling

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    if lns:
        apply_layernorm_scaling(model)
    return model


def read_config_json(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_file():
        raise LNSError(f"config file '{path}' not found")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise LNSError(f"config file '{path}' is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise LNSError(f"config file '{path}' must hold a JSON object")
    if data.get("model_type", "llama") != "llama":
        raise LNSError(f"init builds Llama-style models; config '{path}' has model_type '{data['model_type']}'")
    return data


def init_model(
    preset: str | None,
    out: str | os.PathLike,
    *,
    lns: bool = True,
    tokenizer: str | os.PathLike | None = None,
    config: dict | str | os.PathLike | None = None,
    overwrite: bool = False,
    seed: int = 0,
) -> Path:
    """Write a from-scratch model to ``out``: an LNS custom-code checkpoint, or the Pre-LN baseline with
    ``lns=False``. ``config`` (a dict or a JSON file) overrides the preset's fields or replaces the preset."""
    from lns_surgery import load_tokenizer

    if preset is None and config is None:
        raise LNSError(f"give a preset ({', '.join(PRESETS)}) or a config JSON")
    out = Path(out)
    inputs = [tokenizer, config if isinstance(config, (str, os.PathLike)) else None]
    outputs.check_output(out, overwrite, inputs)
    overrides = read_config_json(config) if isinstance(config, (str, os.PathLike)) else dict(config or {})
    tok = load_tokenizer(tokenizer) if tokenizer is not None else None
    model = build_scratch_model(preset_config(preset, overrides, tok), lns=lns, seed=seed)

    with outputs.atomic_output_dir(out, overwrite, inputs) as staging:
        model.save_pretrained(staging)
        if tok is not None:
            tok.save_pretrained(staging)
    return out


# --- loading the model and tokenizer of a training run -------------------------------------------


def _quantization(model_config):
    """bitsandbytes settings for QLoRA, or None. 4/8-bit training needs a CUDA GPU."""
    if not (model_config.load_in_4bit or model_config.load_in_8bit):
        return None
    import torch

    if not torch.cuda.is_available():
        raise LNSError("QLoRA (load_in_4bit / load_in_8bit) needs a CUDA GPU and bitsandbytes; this machine has no GPU")
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is None:
        raise LNSError("QLoRA (load_in_4bit / load_in_8bit) needs bitsandbytes: pip install bitsandbytes")
    if not model_config.use_peft:
        raise LNSError("a 4/8-bit model can only be trained with LoRA: set use_peft: true")
    from trl import get_quantization_config

    return get_quantization_config(model_config)


def _packing_attention(training, model_config) -> str | None:
    import importlib.util

    import torch

    from lns_surgery.training.performance import packing_attention

    choice = packing_attention(training, model_config, torch.cuda.is_available(),
                               importlib.util.find_spec("flash_attn") is not None)
    if choice:
        logger.info("packed batches: attention %s keeps documents apart without a dense mask", choice)
    return choice


def load_model(args, training, model_config, tokenizer=None):
    """The model a recipe trains, with LayerNorm Scaling in place where the recipe asks for it."""
    from lns_surgery import load_model as load_checkpoint
    from lns_surgery.conversion import apply_layernorm_scaling, is_lns_model

    if args.init_preset is not None:
        if tokenizer is None:
            raise LNSError("init_preset needs tokenizer_name_or_path (the tokenizer fixes the vocabulary)")
        model = build_scratch_model(preset_config(args.init_preset, tokenizer=tokenizer), lns=args.init_lns,
                                    seed=training.seed)
    else:
        if not model_config.model_name_or_path:
            raise LNSError("the recipe needs model_name_or_path (or init_preset)")
        kwargs = {"dtype": model_config.dtype, "revision": model_config.model_revision}
        attention = model_config.attn_implementation or _packing_attention(training, model_config)
        if attention:
            kwargs["attn_implementation"] = attention
        quantization = _quantization(model_config)
        if quantization is not None:
            from trl import get_kbit_device_map

            kwargs.update(quantization_config=quantization, device_map=get_kbit_device_map())
        kwargs.update(training.model_init_kwargs or {})
        model = load_checkpoint(resolve_builtin(model_config.model_name_or_path),
                                trust_remote_code=training.trust_remote_code, **kwargs)
    if args.lns_convert:
        if is_lns_model(model):
            logger.warning("lns_convert: the model already has LayerNorm Scaling; it is trained as it is")
        else:
            from lns_surgery.training.distributed import outside_zero3_init

            with outside_zero3_init():  # it traces a meta twin of the model, which must stay whole
                apply_layernorm_scaling(model, alpha=0.0 if args.lns_ramp_steps else 1.0)
    if args.lns_ramp_steps and not is_lns_model(model):
        raise LNSError("lns_ramp_steps needs an LNS model: set lns_convert: true or start from an LNS checkpoint")
    return model


def load_tokenizer(args, model_config):
    from lns_surgery import load_tokenizer as load

    source = args.tokenizer_name_or_path or model_config.model_name_or_path
    if source is None:
        raise LNSError("the recipe needs tokenizer_name_or_path")
    return load(resolve_builtin(source), revision=model_config.model_revision)


def norm_module_names(model) -> list[str]:
    """Leaf names of the model's normalisation modules (``input_layernorm``, ``norm``, ``ln_f``, ...)."""
    names = set()
    for name, module in model.named_modules():
        if name and "norm" in type(module).__name__.lower():
            names.add(name.rsplit(".", 1)[-1])
    return sorted(names)


def freeze_scaled_norms(model) -> list[str]:
    """Stop training the norms LNS scales, so healing cannot learn ``w -> sqrt(l) * w`` and undo the
    surgery; returns the frozen parameter names. A model without LNS has nothing to freeze."""
    from lns_surgery.modeling.lns_layers import resolve_layers

    lns = getattr(model.config, "lns", None)
    if not lns:
        raise LNSError("heal_norms: freeze needs an LNS model (convert it, or set lns_convert: true)")
    frozen = []
    for index, block in enumerate(resolve_layers(model, lns["layers"])):
        for norm in lns["norms"]:
            for name, parameter in block.get_submodule(norm).named_parameters():
                parameter.requires_grad_(False)
                frozen.append(f"{lns['layers']}.{index}.{norm}.{name}")
    return frozen
