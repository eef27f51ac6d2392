"""The LayerNorm Scaling a checkpoint carries, as its config says: one reading for every stage.

A config (a ``config.json`` dict, or a transformers config object of a model in memory) is

- ``"lns"``: it has an ``lns`` record (code mode); the LNS classes compute each block's scale from
  the record's ``alpha`` whenever they run, so the scales are derived, never read;
- ``"lns-folded"``: it has an ``lns_folded`` record; a stock checkpoint whose norm weights carry the
  scales, which the record lists (``scales``) beside the ``alpha`` they were computed from;
- ``"stock"``: neither; nothing is scaled.

A record read from disk is checked first (``lns_record_problem``): its alpha, and any scales it
lists, are derived again from the rule and must agree, so a hand-edited record is refused rather
than copied into a model card or folded into weights.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from lns_surgery.core.errors import LNSError

_RECORD_KEYS = (("lns", "lns"), ("lns_folded", "lns-folded"))  # config key -> kind; a code-mode record wins
RULE = "1/sqrt(l)"  # the only rule a record may name (lns_layers.RULE)
FOLD_RULE_NAMES = ("scale", "one_plus")  # the fold rules norm_math knows (norm_math.FOLD_RULES)


@dataclass(frozen=True)
class LNSStatus:
    kind: str  # "stock", "lns" or "lns-folded"
    record: dict | None  # the config's ``lns`` or ``lns_folded`` record; None for a stock config

    @property
    def alpha(self) -> float | None:
        """The LNS strength (1 = the full 1/sqrt(l) scaling), or None for a stock config."""
        return float(self.record.get("alpha", 1.0)) if self.record is not None else None

    def scales(self, num_layers: int) -> list[float]:
        """The scale each of ``num_layers`` blocks applies: 1.0 for a stock model; for a folded one the
        scales folded into its weights (as recorded, else as its alpha gives them)."""
        if self.record is None:
            return [1.0] * num_layers
        recorded = self.record.get("scales") if self.kind == "lns-folded" else None
        if isinstance(recorded, list):
            if len(recorded) != num_layers:  # a record for another model: its scales describe other blocks
                raise LNSError(f"the checkpoint's LNS record lists {len(recorded)} scales, but the model has "
                               f"{num_layers} blocks")
            return [float(scale) for scale in recorded]
        return [expected_scale(index, self.alpha) for index in range(num_layers)]


def _field(config, key: str):
    return config.get(key) if isinstance(config, dict) else getattr(config, key, None)


def lns_status(config) -> LNSStatus:
    """The LNS status of ``config``: a dict, a transformers config, or None (a model without a config).

    A record that is not a mapping still gives its kind, with no alpha and no scales; configs read
    from disk never have one (``lns_record_problem`` refuses it first).
    """
    for key, kind in _RECORD_KEYS:
        record = _field(config, key)
        if record:
            return LNSStatus(kind, record if isinstance(record, dict) else None)
    return LNSStatus("stock", None)


def config_num_layers(config: dict) -> int | None:
    """How many decoder blocks a config says the model has (a multimodal config: its text model's)."""
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        if isinstance(config.get(key), int) and not isinstance(config.get(key), bool):
            return config[key]
    text_config = config.get("text_config")
    return config_num_layers(text_config) if isinstance(text_config, dict) else None


def expected_scale(index: int, alpha: float) -> float:
    """The scale of the block at 0-based ``index`` for ``alpha``: ``lns_layers.layer_scale``'s rule
    (1/sqrt(l) at alpha 1, moved linearly towards 1 as alpha goes to 0), without importing torch."""
    return 1.0 + alpha * (1.0 / math.sqrt(index + 1) - 1.0)


_SCALE_TOLERANCE = 1e-6  # relative: scales are written as JSON floats, which round-trip exactly


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def lns_record_problem(config: dict) -> str | None:
    """What is wrong with a config's ``lns`` / ``lns_folded`` record (hand-edited, or from another tool),
    or None. A wrong type or an alpha outside [0, 1] would otherwise fail deep inside, or scale silently
    wrong (alpha 3 gives negative scales); recorded scales are re-derived from the alpha and must agree.

    Alpha 0 is allowed: a ramped training run starts there (the model's original function).
    """
    for key, _ in _RECORD_KEYS:
        if key not in config:
            continue
        record = config[key]
        if not isinstance(record, dict):
            return f"'{key}' must be an object, not {type(record).__name__} {record!r}"
        if not isinstance(record.get("layers"), str) or not record["layers"]:
            return f"'{key}.layers' must name the decoder blocks (a module path such as 'model.layers')"
        norms = record.get("norms")
        if not isinstance(norms, list) or not norms or not all(isinstance(n, str) and n for n in norms):
            return f"'{key}.norms' must be a non-empty list of norm names"
        if len(set(norms)) != len(norms):
            return f"'{key}.norms' names a norm more than once, which would scale it twice"
        alpha = record.get("alpha", 1.0)
        if not _number(alpha) or not 0.0 <= alpha <= 1.0:
            return f"'{key}.alpha' must be a number from 0 to 1, got {alpha!r}"
        if record.get("rule", RULE) != RULE:
            return f"'{key}.rule' is {record['rule']!r}; this tool knows only {RULE!r}"
        fold_rule = record.get("fold_rule")
        if fold_rule is not None and fold_rule not in FOLD_RULE_NAMES:
            return f"'{key}.fold_rule' must be one of {', '.join(FOLD_RULE_NAMES)}, got {fold_rule!r}"
        if key == "lns" and not isinstance(record.get("base_model_type"), str):
            return "'lns.base_model_type' must name the base model type"
        if key == "lns" and not isinstance(record.get("base_classes"), dict):
            return "'lns.base_classes' must map Auto classes to the base model's classes"
        if "scales" in record:
            problem = _scales_problem(key, record["scales"], alpha, config_num_layers(config))
            if problem:
                return problem
    return None


def _scales_problem(key: str, scales, alpha: float, num_layers: int | None) -> str | None:
    """Recorded scales: one finite number in (0, 1] per block, each the scale its alpha gives."""
    if not isinstance(scales, list) or not all(_number(value) for value in scales):
        return f"'{key}.scales' must be a list of finite numbers"
    if num_layers is not None and len(scales) != num_layers:
        return f"'{key}.scales' lists {len(scales)} scales for the config's {num_layers} blocks"
    outside = next((index for index, value in enumerate(scales) if not 0.0 < value <= 1.0), None)
    if outside is not None:
        return f"'{key}.scales' must lie in (0, 1]; block {outside + 1} has {scales[outside]!r}"
    for index, value in enumerate(scales):
        expected = expected_scale(index, alpha)
        if abs(value - expected) > _SCALE_TOLERANCE * expected:
            return (f"'{key}.scales' gives block {index + 1} the scale {value!r}, but its alpha {alpha!r} gives "
                    f"{expected!r}: the record was edited or written by another tool")
    return None
