"""The registry is data: check every entry against the real module tree of the installed transformers,
and check that inspection of the model finds the same layout by itself."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from torch import nn
from tiny_models import tiny_config, tiny_model

from lns_surgery.conversion.detect import detect_architecture
from lns_surgery.conversion.registry import load_registry, lookup, parse_registry, supported_architectures
from lns_surgery.core.errors import LNSError

ARCHS = supported_architectures()
REQUIRED = {"llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "gemma", "gemma2",
            "gemma3_text", "phi3", "granite", "deepseek_v3", "gpt2", "gpt_neox", "olmo", "olmo2",
            # what people fine-tune now
            "qwen3_5", "qwen3_5_moe", "qwen3_next", "gemma3", "gemma4", "gemma4_text", "llama4_text",
            "deepseek_v2", "deepseek_v4", "gpt_oss", "glm4", "glm4_moe", "minimax_m2", "mistral3", "ministral3",
            "nemotron", "nemotron_h", "falcon_h1", "lfm2", "granitemoehybrid", "cohere", "cohere2", "phi", "phimoe"}
ZOO = json.loads((Path(__file__).with_name("zoo_expectations.json")).read_text())


def test_registry_covers_the_required_families():
    assert REQUIRED <= set(load_registry())


@pytest.mark.parametrize("arch", ARCHS, ids=lambda arch: arch.model_type)
def test_every_entry_is_proven_by_the_zoo(arch):
    """The zoo test converts each family and compares it with the hook reference on these norms."""
    record = ZOO.get(arch.model_type)
    assert record is not None, f"{arch.model_type} is not in tests/zoo_expectations.json"
    assert record["outcome"] == "exact" and (record["layers"], tuple(record["norms"])) == (arch.layers, arch.norms)


def test_post_norm_architectures_are_refused_with_the_reason():
    with pytest.raises(LNSError, match="post-norm"):
        lookup("olmo2")
    # And detection alone reaches the same verdict: no norm feeds a sublayer in OLMo-2.
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(tiny_config("olmo2"))
    with pytest.raises(LNSError, match="post-norm"):
        detect_architecture(model)


def test_registry_validation_rejects_bad_entries():
    document = {"schema_version": 2, "default": {"layers": "model.layers", "norms": ["a", "b"]}}
    parsed = parse_registry({**document, "architectures": {"llama": {}, "gpt2": {"layers": "transformer.h", "norms": ["c"]}}})
    assert (parsed["llama"].layers, parsed["llama"].norms) == ("model.layers", ("a", "b"))
    assert (parsed["gpt2"].layers, parsed["gpt2"].norms) == ("transformer.h", ("c",))
    assert parsed["llama"].classes["AutoModelForCausalLM"] == "LlamaForCausalLM"  # derived, not stored
    for broken in ({"norms": ["a", "a"]}, {"layers": ""}, {"norm_kind": "rmsnorm"}, {"classes": {}}):
        with pytest.raises(ValueError):
            parse_registry({**document, "architectures": {"llama": broken}})
    with pytest.raises(ValueError):
        parse_registry({"schema_version": 1, "architectures": {}})
    # A family the installed transformers lacks is left out rather than failing.
    assert "no_such_family" not in parse_registry({**document, "architectures": {"no_such_family": {}}})


def test_never_scaled_norms_stay_stock():
    """q/k norms (Qwen3), Gemma-2's post norms and every final norm keep their stock class."""
    import lns_surgery

    for model_type, untouched in (
        ("qwen3", ["model.layers.2.self_attn.q_norm", "model.layers.2.self_attn.k_norm", "model.norm"]),
        ("gemma2", ["model.layers.2.post_attention_layernorm", "model.layers.2.post_feedforward_layernorm", "model.norm"]),
        ("gpt2", ["transformer.ln_f"]),
    ):
        stock = tiny_model(model_type)
        lns = lns_surgery.apply_layernorm_scaling(copy.deepcopy(stock))
        for name in untouched:
            assert type(lns.get_submodule(name)) is type(stock.get_submodule(name)), name
            assert not hasattr(lns.get_submodule(name), "lns_scale"), name


def test_load_registry_is_cached_and_frozen():
    registry = load_registry()
    assert registry is load_registry()
    with pytest.raises(AttributeError):
        registry["llama"].layers = "elsewhere"
