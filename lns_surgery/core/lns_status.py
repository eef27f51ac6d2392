"""The LayerNorm Scaling a checkpoint carries, as its config says: one reading for every stage.

A config (a ``config.json`` dict, or a transformers config object of a model in memory) is

- ``"lns"``: it has an ``lns`` record (code mode); the LNS classes compute each block's scale from
  the record's ``alpha`` whenever they run, so the scales are derived, never read;
- ``"lns-folded"``: it has an ``lns_folded`` record; a stock checkpoint whose norm weights carry the
  scales, which the record lists (``scales``) beside the ``alpha`` they were computed from;
- ``"stock"``: neither; nothing is scaled.
"""

from __future__ import annotations

from dataclasses import dataclass

_RECORD_KEYS = (("lns", "lns"), ("lns_folded", "lns-folded"))  # config key -> kind; a code-mode record wins


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
        if isinstance(recorded, list) and len(recorded) == num_layers:
            return [float(scale) for scale in recorded]
        from lns_surgery.modeling.lns_layers import layer_scale  # imports torch: only when scales are asked for

        return [layer_scale(index, self.alpha) for index in range(num_layers)]


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


def lns_record_problem(config: dict) -> str | None:
    """What is wrong with a config's ``lns`` / ``lns_folded`` record (hand-edited, or from another tool),
    or None. A wrong type or an alpha outside [0, 1] would otherwise fail deep inside, or scale silently
    wrong (alpha 3 gives negative scales)."""
    def number(value):
        return isinstance(value, (int, float)) and not isinstance(value, bool)

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
        alpha = record.get("alpha", 1.0)
        if not number(alpha) or not 0.0 <= alpha <= 1.0:
            return f"'{key}.alpha' must be a number from 0 to 1, got {alpha!r}"
        if key == "lns" and not isinstance(record.get("base_model_type"), str):
            return "'lns.base_model_type' must name the base model type"
        if key == "lns" and not isinstance(record.get("base_classes"), dict):
            return "'lns.base_classes' must map Auto classes to the base model's classes"
        scales = record.get("scales")
        if scales is not None and not (isinstance(scales, list) and all(number(v) for v in scales)):
            return f"'{key}.scales' must be a list of numbers"
    return None
