"""Converting checkpoints: the architecture registry, detection, code and fold modes.

The API other stages use is imported lazily, like the package's own. ``convert`` itself is
``lns_surgery.convert``: here that name is the module ``lns_surgery.conversion.convert``.
"""

from __future__ import annotations

from lns_surgery._lazy import lazy_exports

_API = {
    "fold": "lns_surgery.conversion.convert",
    "inspect_checkpoint": "lns_surgery.conversion.convert",
    "apply_layernorm_scaling": "lns_surgery.conversion.apply",
    "set_lns_alpha": "lns_surgery.conversion.apply",
    "is_lns_model": "lns_surgery.conversion.apply",
    "architecture_for_model": "lns_surgery.conversion.apply",
    "supported_architectures": "lns_surgery.conversion.registry",
    "register_auto_classes": "lns_surgery.conversion.registry",
}

__all__ = sorted(_API)


__getattr__, __dir__ = lazy_exports(__name__, _API, globals())
