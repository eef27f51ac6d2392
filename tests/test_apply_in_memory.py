"""Converting a model in memory (``lns_convert`` in a recipe) whatever it was loaded with."""

from __future__ import annotations

import pytest
import torch
from conftest import STORIES, shared_path

from lns_surgery import apply_layernorm_scaling


def test_a_loaded_model_answers_its_lns_model_type():
    """A loaded config holds model_type as an instance attribute; after the surgery every reader must see
    lns_<base>, as to_dict() does, or tables keyed by model type treat the model as the stock one."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(shared_path(STORIES))
    assert "model_type" in vars(model.config)
    apply_layernorm_scaling(model)
    assert model.config.model_type == model.config.to_dict()["model_type"] == "lns_llama"


@pytest.mark.parametrize("attention", ["flex_attention", "eager"])
def test_a_model_loaded_with_another_attention_kernel_converts(attention):
    """Packed training on a GPU loads models with flex attention, which no trace can run on the meta
    device; the data flow that decides the norms does not depend on the attention kernel."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                         num_attention_heads=4)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attention)
    apply_layernorm_scaling(model)
    assert model.config.lns["norms"] == ["input_layernorm", "post_attention_layernorm"]
    assert model.config._attn_implementation == attention  # the model itself keeps its kernel
