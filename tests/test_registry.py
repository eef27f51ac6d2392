"""The registry is data: check every entry against the real module tree of the installed transformers,
and check that inspection of the model finds the same layout by itself."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from tiny_models import NUM_LAYERS, tiny_config, tiny_model

from lns_surgery.conversion.convert import norm_tensors
from lns_surgery.conversion.detect import detect_architecture, norm_kind
from lns_surgery.conversion.registry import load_registry, lookup, parse_registry, supported_architectures
from lns_surgery.errors import LNSError

ARCHS = supported_architectures()
REQUIRED = {"llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "gemma", "gemma2",
            "gemma3_text", "phi3", "granite", "deepseek_v3", "gpt2", "gpt_neox", "olmo"}


def test_registry_covers_the_required_families():
    assert REQUIRED <= {arch.model_type for arch in ARCHS}


@pytest.mark.parametrize("arch", ARCHS, ids=lambda arch: arch.model_type)
def test_entry_matches_the_real_module_tree(arch):
    import transformers

    model = tiny_model(arch.model_type)
    assert type(model).__name__ == arch.classes["AutoModelForCausalLM"]
    assert type(model.config).__name__ == arch.classes["config"]
    for auto_name, class_name in arch.classes.items():
        assert hasattr(transformers, class_name), f"{auto_name}: {class_name}"
    blocks = model.get_submodule(arch.layers)
    assert isinstance(blocks, nn.ModuleList) and len(blocks) == NUM_LAYERS
    for block in blocks:
        for name in arch.norms:
            assert norm_kind(block.get_submodule(name)) == arch.norm_kind
    # Every parameter of the scaled norms is found under its state-dict name, which fold mode rewrites.
    per_block = norm_tensors(model, arch.lns_block(), dict.fromkeys(model.state_dict()))
    assert len(per_block) == NUM_LAYERS and all(per_block) == (arch.norm_kind != "output")


@pytest.mark.parametrize("arch", ARCHS, ids=lambda arch: arch.model_type)
def test_detection_on_meta_device_agrees_with_registry(arch):
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(tiny_config(arch.model_type))
    detected = detect_architecture(model)
    assert (detected.layers, detected.norms, detected.norm_kind) == (arch.layers, arch.norms, arch.norm_kind)
    assert detected.classes == arch.classes


def test_post_norm_architectures_are_refused_with_the_reason():
    with pytest.raises(LNSError, match="post-norm"):
        lookup("olmo2")
    # And detection alone reaches the same verdict: no norm feeds a sublayer in OLMo-2.
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(tiny_config("olmo2"))
    with pytest.raises(LNSError, match="pre-sublayer norms"):
        detect_architecture(model)


def test_registry_validation_rejects_bad_entries():
    good = {"layers": "model.layers", "norms": ["a", "b"], "norm_kind": "rmsnorm",
            "classes": {"config": "LlamaConfig", "AutoModelForCausalLM": "LlamaForCausalLM"}}
    assert parse_registry({"schema_version": 1, "architectures": {"x": good}})["x"].norms == ("a", "b")
    for broken in (
        {**good, "norm_kind": "batchnorm"},
        {**good, "norms": ["a", "a"]},
        {**good, "layers": ""},
        {**good, "extra": 1},
    ):
        with pytest.raises(ValueError):
            parse_registry({"schema_version": 1, "architectures": {"x": broken}})
    with pytest.raises(ValueError):
        parse_registry({"architectures": {}})
    # A family the installed transformers lacks is left out rather than failing.
    missing = {**good, "classes": {"config": "NoSuchConfig", "AutoModelForCausalLM": "NoSuchForCausalLM"}}
    assert "x" not in parse_registry({"schema_version": 1, "architectures": {"x": missing}})


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
