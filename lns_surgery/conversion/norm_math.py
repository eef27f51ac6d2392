"""Folding a norm's scale into its stored weights, proven per norm class before any tensor is written.

A folded checkpoint runs the *stock* norm class, so the new weights must make ``stock(x)`` equal
``c * stock_original(x)``. Two rules cover the norms in use: scale every parameter (``w * x_hat``,
``w * x_hat + b``, mean-centred or not) or, for norms that compute ``(1 + w) * x_hat (+ b)`` (Gemma,
Qwen3-Next, Nemotron's LayerNorm1P), set ``w' = c * (1 + w) - 1`` and scale the rest. A rule is
used only after a CPU copy of the class with random weights has shown it exact; a norm that neither
rule fits cannot be folded, and fold mode refuses it by class name.
"""

from __future__ import annotations

import torch
from torch import nn

from lns_surgery.modeling.lns_layers import (
    PROBE_SCALE,
    cpu_probe,
    norm_width,
    probe_attributes,
    probe_input,
    probe_matches,
    stock_class,
)

FOLD_RULES = ("scale", "one_plus")


def fold_tensor(rule: str, parameter_name: str, tensor: torch.Tensor, scale: float) -> torch.Tensor:
    """The folded value of one norm parameter (computed in fp32; the caller casts back)."""
    tensor = tensor.to(torch.float32)
    if rule == "one_plus" and parameter_name == "weight":
        return scale * (1.0 + tensor) - 1.0
    if rule in FOLD_RULES:
        return scale * tensor
    raise ValueError(f"unknown fold rule {rule!r}")


_PROVEN: dict = {}


def fold_rule(module: nn.Module) -> str | None:
    """The rule that folds ``c`` into this norm's parameters exactly, or None (no parameters, or no rule fits)."""
    names = [name for name, _ in module.named_parameters(recurse=False)]
    width = norm_width(module)
    if not names or width is None:
        return None
    key = (stock_class(module), width, tuple(names), probe_attributes(module))
    if key not in _PROVEN:
        _PROVEN[key] = next((rule for rule in FOLD_RULES if _rule_is_exact(module, rule, width)), None)
    return _PROVEN[key]


def _rule_is_exact(module: nn.Module, rule: str, width: int) -> bool:
    try:
        probe = cpu_probe(module)
        x = probe_input(width)
        with torch.no_grad():
            expected = PROBE_SCALE * probe(x)
            for name, parameter in probe.named_parameters(recurse=False):
                parameter.copy_(fold_tensor(rule, name, parameter, PROBE_SCALE))
            actual = probe(x)
        return probe_matches(actual, expected)
    except Exception:  # a rule that does not run on this class does not fit it
        return False
