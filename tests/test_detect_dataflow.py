"""Detection follows data, not object identity: a norm is a pre-sublayer norm when it reads the
residual stream and its output, however reshaped or routed, reaches a sublayer; blocks it cannot
classify, and post-norm blocks, are refused with a reason instead of being converted in part."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from lns_surgery.conversion.detect import find_pre_norms
from lns_surgery.core.errors import LNSError

H = 8


class Routed(nn.Module):
    """A mixture of experts that reads its input through a flat view and per-expert index lists,
    and, like real MoE code, cannot run on the meta device (data-dependent shapes)."""

    def __init__(self, fail_on_meta=True):
        super().__init__()
        self.experts = nn.ModuleList(nn.Linear(H, H) for _ in range(2))
        self.fail_on_meta = fail_on_meta

    def forward(self, flat):
        if self.fail_on_meta and flat.is_meta:
            raise RuntimeError("cannot compute nonzero() on meta tensors")
        out = torch.zeros_like(flat)
        for index, expert in enumerate(self.experts):
            rows = torch.arange(index, flat.shape[0], 2, device=flat.device)
            out.index_add_(0, rows, expert(flat[rows]))
        return out


class Block(nn.Module):
    def __init__(self, layout):
        super().__init__()
        self.layout = layout
        self.attn, self.mlp = nn.Linear(H, H), nn.Linear(H, H)
        self.moe = Routed()
        self.norm_a, self.norm_b, self.post_norm = nn.LayerNorm(H), nn.LayerNorm(H), nn.LayerNorm(H)

    def forward(self, x):
        if self.layout == "pre":
            h = x + self.attn(self.norm_a(x))
            return h + self.mlp(self.norm_b(h))
        if self.layout == "pre_routed":  # the MLP norm's output reaches the experts only through a view
            h = x + self.attn(self.norm_a(x))
            flat = self.norm_b(h).view(-1, H)
            return h + self.moe(flat).view_as(h)
        if self.layout == "parallel":  # one norm feeds attention and MLP
            n = self.norm_a(x)
            return x + self.attn(n) + self.mlp(n)
        if self.layout == "sandwich":  # Gemma-2: pre norms, and post norms on the sublayer outputs
            h = x + self.post_norm(self.attn(self.norm_a(x)))
            return h + self.mlp(self.norm_b(h))
        if self.layout == "post_ln":  # BERT: the residual passes through the norms
            h = self.norm_a(x + self.attn(x))
            return self.norm_b(h + self.mlp(h))
        if self.layout == "stray_norm":  # a norm on the residual stream that feeds nothing
            h = x + self.attn(self.norm_a(x))
            return self.norm_b(h) + self.mlp(h)
        raise ValueError(self.layout)


class Toy(nn.Module):
    def __init__(self, layouts):
        super().__init__()
        self.config = SimpleNamespace(pad_token_id=None)
        self.embed = nn.Embedding(16, H)
        self.layers = nn.ModuleList(Block(layout) for layout in layouts)

    def forward(self, input_ids):
        x = self.embed(input_ids)
        for layer in self.layers:
            x = layer(x)
        return x


def _on_meta(layouts):
    with torch.device("meta"):
        return Toy(layouts)


@pytest.mark.parametrize("layout, expected", [
    ("pre", ["norm_a", "norm_b"]),
    ("pre_routed", ["norm_a", "norm_b"]),
    ("parallel", ["norm_a"]),
    ("sandwich", ["norm_a", "norm_b"]),
])
def test_pre_sublayer_norms_are_found_through_any_data_path(layout, expected):
    assert find_pre_norms(_on_meta([layout, layout]), "layers") == [expected, expected]


@pytest.mark.parametrize("layout, reason", [
    ("post_ln", "post-norm"),
    ("stray_norm", "norm 'norm_b' normalises the residual stream but feeds no sublayer"),
])
def test_blocks_that_cannot_be_classified_are_refused(layout, reason):
    with pytest.raises(LNSError, match=reason) as error:
        find_pre_norms(_on_meta(["pre", layout]), "layers")
    assert "block 1 (Block)" in str(error.value)


def test_the_stand_in_is_removed_after_tracing():
    model = _on_meta(["pre_routed"])
    find_pre_norms(model, "layers")
    assert "forward" not in vars(model.layers[0].moe)
    with pytest.raises(RuntimeError, match="meta"):
        model(torch.ones(1, 4, dtype=torch.long, device="meta"))


def test_a_registry_family_whose_config_adds_a_pre_norm_is_converted_with_it(tmp_path):
    """Gemma 4's mixture-of-experts variant feeds its experts through a third pre-norm: the data flow
    finds it, the registry knows that variant, and the result equals the hook reference on all three."""
    import json

    from test_zoo import hooked_logits
    from transformers import AutoModelForCausalLM

    import lns_surgery
    import zoo_models

    config = zoo_models.tiny_config("gemma4_text")
    config.enable_moe_block, config.num_experts, config.top_k_experts, config.moe_intermediate_size = True, 4, 2, 32
    torch.manual_seed(0)
    stock = AutoModelForCausalLM.from_config(config).eval()
    zoo_models.perturb_norms(stock)
    stock.save_pretrained(tmp_path / "stock")
    lns_surgery.convert(tmp_path / "stock", tmp_path / "lns")
    norms = json.loads((tmp_path / "lns" / "config.json").read_text())["lns"]["norms"]
    assert norms == ["input_layernorm", "pre_feedforward_layernorm", "pre_feedforward_layernorm_2"]
    inputs = zoo_models.make_inputs(stock, "AutoModelForCausalLM")
    reference = hooked_logits(stock, "model.layers", norms, inputs)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "lns", trust_remote_code=True).eval()
    with torch.no_grad():
        assert (loaded(**inputs).logits - reference).abs().max() <= 1e-5


def test_a_registry_layout_the_data_flow_contradicts_is_refused(monkeypatch):
    import dataclasses

    from tiny_models import tiny_model

    from lns_surgery.conversion import apply, registry

    wrong = dataclasses.replace(registry.lookup("llama"), norms=("input_layernorm",))
    monkeypatch.setattr(apply, "lookup", lambda model_type: wrong)
    with pytest.raises(LNSError, match=r"data flow shows .* \['input_layernorm', 'post_attention_layernorm'\], not the registry"):
        apply.architecture_for_model(tiny_model("llama"))
