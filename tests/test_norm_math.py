"""Norm math is proven, never assumed: the weight form LNS installs and the fold rule it writes are
used only where a CPU copy of the norm class shows them equal to ``c * stock(x)``; every other norm
has its output scaled, which is exact whatever it computes."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers.models.cohere.modeling_cohere import CohereLayerNorm
from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
from transformers.models.llama.modeling_llama import LlamaRMSNorm
from transformers.models.nemotron.modeling_nemotron import NemotronLayerNorm1P
from transformers.models.olmo.modeling_olmo import OlmoLayerNorm

from lns_surgery.conversion.norm_math import fold_rule, fold_tensor
from lns_surgery.modeling.lns_layers import exact_kind, scaled_norm_class

WIDTH = 24
SCALE = 0.61


class ShiftedRMSNorm(nn.Module):
    """A norm nobody has seen: RMS-normalised, then w * x_hat + 0.1 (a constant offset no weight form has)."""

    def __init__(self, width):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))
        self.eps = 1e-6

    def forward(self, x):
        return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) + 0.1


CASES = {  # class -> (the form LNS may use, the fold rule)
    "llama": (lambda: LlamaRMSNorm(WIDTH), "rmsnorm", "scale"),
    "gemma": (lambda: GemmaRMSNorm(WIDTH), "gemma_rmsnorm", "one_plus"),
    "layernorm": (lambda: nn.LayerNorm(WIDTH), "layernorm", "scale"),
    "layernorm_without_bias": (lambda: nn.LayerNorm(WIDTH, bias=False), "layernorm", "scale"),
    # An nn.LayerNorm subclass computing (1 + w) * x_hat + b: the LayerNorm weight form would be wrong.
    "nemotron": (lambda: NemotronLayerNorm1P(WIDTH), "output", "one_plus"),
    "cohere": (lambda: CohereLayerNorm(WIDTH), "output", "scale"),  # mean-centred, weight only
    "olmo": (lambda: OlmoLayerNorm(WIDTH), "output", None),  # no parameters
    "unknown": (lambda: ShiftedRMSNorm(WIDTH), "output", None),
}


def _randomise(norm):
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for parameter in norm.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator))
    return norm


@pytest.mark.parametrize("name", CASES)
def test_scaled_norm_equals_scaled_stock_output(name):
    make, expected_kind, expected_rule = CASES[name]
    norm = _randomise(make())
    x = torch.randn(3, 7, WIDTH, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        reference = SCALE * norm(x)
    kind = exact_kind(norm)
    assert kind == expected_kind
    scaled = _randomise(make())
    scaled.__class__ = scaled_norm_class(type(scaled), kind)
    scaled.lns_scale = SCALE
    with torch.no_grad():
        assert torch.allclose(scaled(x), reference, rtol=1e-5, atol=1e-6)

    assert fold_rule(norm) == expected_rule
    if expected_rule is not None:
        folded = _randomise(make())
        with torch.no_grad():
            for parameter_name, parameter in folded.named_parameters():
                parameter.copy_(fold_tensor(expected_rule, parameter_name, parameter, SCALE))
            assert torch.allclose(folded(x), reference, rtol=1e-5, atol=1e-6)


def test_a_recorded_form_that_does_not_hold_falls_back_to_the_output():
    # A checkpoint says "layernorm" but the installed class computes (1 + w) * x_hat + b.
    assert exact_kind(NemotronLayerNorm1P(WIDTH), "layernorm") == "output"
    assert exact_kind(nn.LayerNorm(WIDTH), "layernorm_no_affine") == "output"  # schema-1 name


def test_the_proof_runs_on_meta_norms_and_leaves_the_module_alone():
    with torch.device("meta"):
        norm = NemotronLayerNorm1P(WIDTH)
    assert exact_kind(norm) == "output" and fold_rule(norm) == "one_plus"
    assert norm.weight.is_meta and type(norm) is NemotronLayerNorm1P
    real = _randomise(LlamaRMSNorm(WIDTH))
    before = real.weight.detach().clone()
    assert exact_kind(real) == "rmsnorm"
    assert torch.equal(real.weight, before)
