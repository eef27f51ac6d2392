"""Where a plain trace on the meta device cannot classify a block's norms, detection looks further
before it refuses: into wrappers that hold norms beside sublayers, past an identity in the first
block's norm slot and dropout modules, and through a real CPU instance of the model (narrowed when
it is large). Whatever it still cannot establish is refused with the block's class and the reason."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from lns_surgery.conversion import detect
from lns_surgery.conversion.detect import find_pre_norms
from lns_surgery.core.errors import LNSError

H = 8


class Attention(nn.Module):
    def __init__(self, fail_on_meta=False, returns_tuple=False):
        super().__init__()
        self.q, self.o = nn.Linear(H, H), nn.Linear(H, H)
        self.fail_on_meta, self.returns_tuple = fail_on_meta, returns_tuple

    def forward(self, x):
        if self.fail_on_meta and x.is_meta:
            raise RuntimeError("cannot compute nonzero() on meta tensors")
        out = self.o(torch.tanh(self.q(x)))
        return (out, None) if self.returns_tuple else out


class Mlp(nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.down = nn.Linear(H, H), nn.Linear(H, H)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


class NormAttnNorm(nn.Module):
    """DBRX's wrapper: norm, attention, residual add, norm; returns (residual, normalised)."""

    def __init__(self):
        super().__init__()
        self.norm_1, self.attn, self.norm_2 = nn.LayerNorm(H), Attention(), nn.LayerNorm(H)

    def forward(self, x):
        h = x + self.attn(self.norm_1(x))
        return h, self.norm_2(h)


class HyperConnection(nn.Module):
    """A normalised copy of the residual computes gates; the sublayer reads the gated raw stream."""

    def __init__(self):
        super().__init__()
        self.hc_norm, self.gate = nn.LayerNorm(H), nn.Linear(H, H)

    def forward(self, x):
        return torch.sigmoid(self.gate(self.hc_norm(x))).mean() * x


class Block(nn.Module):
    def __init__(self, layout, index=0):
        super().__init__()
        self.layout = layout
        if layout == "wrapped":
            self.norm_attn_norm, self.ffn = NormAttnNorm(), Mlp()
        elif layout == "hyper":
            self.hyper, self.attn = HyperConnection(), Attention()
        else:
            self.attn_norm = nn.Identity() if layout == "identity_first" and index == 0 else nn.LayerNorm(H)
            self.attn = Attention(fail_on_meta=layout == "tuple_on_meta", returns_tuple=layout == "tuple_on_meta")
            self.post_attn_norm, self.mlp_norm, self.mlp = nn.LayerNorm(H), nn.LayerNorm(H), Mlp()
            self.dropout = nn.Dropout(0.1)

    def forward(self, x, image=None):
        if self.layout == "wrapped":
            residual, h = self.norm_attn_norm(x)
            return residual + self.ffn(h)
        if self.layout == "hyper":
            return x + self.attn(self.hyper(x))
        if self.layout == "needs_image" and image is None:
            raise ValueError("this block needs an image")
        attn = self.attn(self.attn_norm(x))
        if self.layout == "tuple_on_meta":
            attn, _ = attn
        h = x + self.dropout(self.post_attn_norm(attn))  # a sandwich norm, then dropout (T5Gemma 2)
        return h + self.mlp(self.mlp_norm(h))


class Toy(nn.Module):
    def __init__(self, layouts, skip=()):
        super().__init__()
        self.config = SimpleNamespace(pad_token_id=None)
        self.embed = nn.Embedding(16, H)
        self.layers = nn.ModuleList(Block(layout, index) for index, layout in enumerate(layouts))
        self.skip = set(skip)

    def forward(self, input_ids):
        x = self.embed(input_ids)
        for index, layer in enumerate(self.layers):
            if index not in self.skip:  # blocks that run only with inputs a text-only forward lacks
                x = layer(x)
        return x


def _on_meta(layouts, **kwargs):
    with torch.device("meta"):
        return Toy(layouts, **kwargs)


def test_norms_inside_a_wrapper_beside_the_attention_are_found_by_their_path():
    assert find_pre_norms(_on_meta(["wrapped", "wrapped"]), "layers") == [["norm_attn_norm.norm_1", "norm_attn_norm.norm_2"]] * 2


def test_a_norm_that_only_computes_gates_from_the_residual_is_refused():
    with pytest.raises(LNSError, match=r"block 0 \(Block\).*norm 'hyper.hc_norm' normalises the residual stream, and "
                                       r"what reads its output \(hyper.gate\) is no attention or MLP module"):
        find_pre_norms(_on_meta(["hyper", "hyper"]), "layers")


def test_dropout_after_a_sandwich_norm_is_no_sublayer_and_an_identity_is_no_norm():
    per_block = find_pre_norms(_on_meta(["identity_first", "identity_first", "identity_first"]), "layers")
    assert per_block == [["mlp_norm"], ["attn_norm", "mlp_norm"], ["attn_norm", "mlp_norm"]]
    blocks = _on_meta(["identity_first"] * 3).layers
    # The first block's scale is 1 at any alpha: an identity in its norm slot is the same layout.
    assert detect._first_block_lacks_only_identities(blocks, per_block) == ["attn_norm", "mlp_norm"]
    other = _on_meta(["plain", "plain", "plain"]).layers
    assert detect._first_block_lacks_only_identities(other, per_block) is None  # a real norm left out: no
    assert detect._first_block_lacks_only_identities(blocks, [["mlp_norm"], ["attn_norm", "mlp_norm"], ["mlp_norm"]]) is None


def test_a_block_that_does_not_run_is_refused_as_such():
    with pytest.raises(LNSError, match=r"block 1 \(Block\) of 'layers' did not run in a text-only forward"):
        find_pre_norms(_on_meta(["plain", "plain"], skip={1}), "layers")


def test_a_block_no_trace_reaches_is_refused_with_the_forwards_failure():
    with pytest.raises(LNSError) as error:
        find_pre_norms(_on_meta(["tuple_on_meta", "tuple_on_meta"]), "layers")
    message = str(error.value)
    assert "block 0 (Block) of 'layers' could not be traced" in message
    assert "the forward failed with ValueError" in message  # the stand-in is no tuple
    assert "no CPU instance could be traced instead: the model has no config to build one from" in message


# --- a real CPU instance -----------------------------------------------------------------------------


@pytest.fixture
def jetmoe():
    """JetMoE: its attention returns three values the block unpacks, and cannot run on the meta device."""
    import zoo_models

    from lns_surgery.conversion.convert import build_on_meta

    return build_on_meta(zoo_models.tiny_config("jetmoe"))


EXPECTED = ["input_layernorm", "post_attention_layernorm"]


def test_a_model_the_meta_device_cannot_trace_is_traced_on_a_cpu_instance(jetmoe, monkeypatch):
    built = []
    real_twin = detect._real_twin
    monkeypatch.setattr(detect, "_real_twin", lambda *a: built.append(1) or real_twin(*a))
    assert find_pre_norms(jetmoe, "model.layers") == [EXPECTED] * len(jetmoe.model.layers)
    assert built
    assert next(jetmoe.parameters()).is_meta  # the caller's model is left as it was


def test_a_large_model_is_traced_on_a_narrowed_copy_of_its_config(jetmoe, monkeypatch):
    narrowed = []
    original = detect._narrowed
    monkeypatch.setattr(detect, "_narrowed", lambda config: narrowed.append(original(config)) or narrowed[-1])
    monkeypatch.setattr(detect, "REAL_TRACE_PARAMETERS", detect._parameter_count(jetmoe) - 1)
    assert find_pre_norms(jetmoe, "model.layers") == [EXPECTED] * len(jetmoe.model.layers)
    assert narrowed[0].hidden_size < jetmoe.config.hidden_size


def test_a_narrowed_copy_with_other_blocks_is_not_used(jetmoe, monkeypatch):
    def fewer_layers(config):
        config = copy.deepcopy(config)
        config.num_hidden_layers -= 1
        return config

    monkeypatch.setattr(detect, "_narrowed", fewer_layers)
    monkeypatch.setattr(detect, "REAL_TRACE_PARAMETERS", detect._parameter_count(jetmoe) - 1)
    with pytest.raises(LNSError, match="no CPU instance could be traced instead: the CPU instance built from its config "
                                       "has other blocks than the model"):
        find_pre_norms(jetmoe, "model.layers")


def test_a_model_too_large_even_narrowed_is_refused_with_its_size(jetmoe, monkeypatch):
    monkeypatch.setattr(detect, "REAL_TRACE_PARAMETERS", 10)
    with pytest.raises(LNSError, match=r"JetMoeDecoderLayer.*even narrowed, the model has [\d,]+ parameters \(over 10\)"):
        find_pre_norms(jetmoe, "model.layers")
