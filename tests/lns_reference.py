"""An independent reference for LayerNorm Scaling: the stock model with forward hooks that multiply
each pre-sublayer norm's output by 1/sqrt(l). It shares no code with lns_surgery; the norm names
come from LNS-FACTS.md, not from the package's registry."""

from __future__ import annotations

import contextlib
import math

# model_type -> (block list, the two pre-sublayer norms), as documented for transformers 5.x.
EXPECTED_LAYOUT = {
    **{t: ("model.layers", ("input_layernorm", "post_attention_layernorm")) for t in (
        "llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "phi3", "granite",
        "granitemoe", "deepseek_v3", "smollm3", "olmoe", "gemma", "starcoder2", "olmo")},
    "gemma2": ("model.layers", ("input_layernorm", "pre_feedforward_layernorm")),
    "gemma3_text": ("model.layers", ("input_layernorm", "pre_feedforward_layernorm")),
    "gpt2": ("transformer.h", ("ln_1", "ln_2")),
    "gpt_neox": ("gpt_neox.layers", ("input_layernorm", "post_attention_layernorm")),
}


@contextlib.contextmanager
def hooked_layout(model, layers_path: str, norms, alpha: float = 1.0):
    """Within the block, ``model`` (a stock model) computes LayerNorm Scaling through output hooks on
    the named norms of every block in ``layers_path``."""
    handles = []
    for index, block in enumerate(model.get_submodule(layers_path)):
        scale = 1.0 + alpha * (1.0 / math.sqrt(index + 1) - 1.0)
        for name in norms:
            handles.append(block.get_submodule(name).register_forward_hook(lambda m, a, out, s=scale: out * s))
    try:
        yield model
    finally:
        for handle in handles:
            handle.remove()


def hooked_reference(model, model_type: str, alpha: float = 1.0):
    """``hooked_layout`` with the documented layout of ``model_type``."""
    layers_path, norms = EXPECTED_LAYOUT[model_type]
    return hooked_layout(model, layers_path, norms, alpha)
