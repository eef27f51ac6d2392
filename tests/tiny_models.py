"""Tiny random models of every architecture, built from transformers' own config classes."""

from __future__ import annotations

import torch
from transformers import CONFIG_MAPPING, AutoModelForCausalLM

NUM_LAYERS = 4
VOCAB = 128

# Sizes every family understands, under whatever names it uses; MoE and MLA families need their own.
_COMMON = {
    "vocab_size": VOCAB,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": NUM_LAYERS,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 8,
    "max_position_embeddings": 64,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 0,
    # GPT-2 names
    "n_embd": 32,
    "n_layer": NUM_LAYERS,
    "n_head": 4,
    "n_positions": 64,
    "n_inner": 64,
}
_PER_TYPE = {
    "mixtral": {"num_local_experts": 4, "num_experts_per_tok": 2},
    "qwen2_moe": {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 16, "shared_expert_intermediate_size": 32},
    "qwen3_moe": {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 16},
    "olmoe": {"num_experts": 4, "num_experts_per_tok": 2},
    "granitemoe": {"num_local_experts": 4, "num_experts_per_tok": 2},
    "deepseek_v3": {
        "n_routed_experts": 4, "num_experts_per_tok": 2, "n_group": 1, "topk_group": 1, "moe_intermediate_size": 16,
        "first_k_dense_replace": 1, "q_lora_rank": 16, "kv_lora_rank": 16, "qk_rope_head_dim": 8,
        "qk_nope_head_dim": 8, "v_head_dim": 8, "head_dim": 8, "n_shared_experts": 1,
        "num_key_value_heads": 4,  # multi-head latent attention has as many KV heads as query heads
    },
    "gemma2": {"query_pre_attn_scalar": 8},
    "gemma3_text": {"query_pre_attn_scalar": 8, "sliding_window": 8},
    "gpt_neox": {"rotary_pct": 0.25},
    "phi3": {"pad_token_id": 0},
}


def tiny_config(model_type: str):
    config_class = CONFIG_MAPPING[model_type]
    fields = getattr(config_class, "__dataclass_fields__", None) or {}
    probe = config_class()
    values = {}
    for key, value in {**_COMMON, **_PER_TYPE.get(model_type, {})}.items():
        if key in fields or hasattr(probe, key):
            values[key] = value
    return config_class(**values)


def tiny_model(model_type: str, seed: int = 0):
    """A tiny random causal LM; norm weights are randomised too so that scaling them is visible."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name or ".ln_" in name:
                param.add_(torch.randn_like(param) * 0.1)
    return model.eval()
