"""LayerNorm Scaling surgery for pretrained Hugging Face decoders.

The public API is imported lazily so that ``import lns_surgery`` (and the CLI's ``--help``) stays fast.
"""

from __future__ import annotations

from lns_surgery._lazy import lazy_exports

__version__ = "0.1.0"

_API = {
    "convert": "lns_surgery.conversion.convert",
    "fold": "lns_surgery.conversion.convert",
    "inspect_checkpoint": "lns_surgery.conversion.convert",
    "apply_layernorm_scaling": "lns_surgery.conversion.apply",
    "set_lns_alpha": "lns_surgery.conversion.apply",
    "is_lns_model": "lns_surgery.conversion.apply",
    "supported_architectures": "lns_surgery.conversion.registry",
    "register_auto_classes": "lns_surgery.conversion.registry",
    "layer_scale": "lns_surgery.modeling.lns_layers",
    "load_model": "lns_surgery.loading",
    "load_tokenizer": "lns_surgery.loading",
    "analyze": "lns_surgery.analysis.run",
    "analyze_model": "lns_surgery.analysis.run",
    "push": "lns_surgery.publish.upload",
    "push_to_hub": "lns_surgery.publish.cli",
    "LNSError": "lns_surgery.core.errors",
}

__all__ = sorted(_API)


__getattr__, __dir__ = lazy_exports(__name__, _API, globals())
