"""The rule every JSON report follows (the depth report, the demo's summary, the studies' results):
JSON has no inf or nan, so a number that is not finite (a perplexity that overflowed) is written as null."""

from __future__ import annotations

import math


def json_safe(value):
    """``value`` with every non-finite float, however deeply nested, replaced by None."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    return value
