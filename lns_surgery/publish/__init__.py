"""Publishing checkpoints to the Hugging Face Hub: validate them, write their model card, upload them.

The API is imported lazily, like the package's own, so that the CLI's ``--help`` stays fast.
"""

from __future__ import annotations

from lns_surgery._lazy import lazy_exports

_API = {
    "push": "lns_surgery.publish.upload",
    "PushResult": "lns_surgery.publish.upload",
    "resolve_token": "lns_surgery.publish.upload",
    "push_to_hub": "lns_surgery.publish.cli",
    "check_checkpoint": "lns_surgery.publish.validate",
    "validate_checkpoint": "lns_surgery.publish.validate",
    "render_model_card": "lns_surgery.publish.card",
    "select_files": "lns_surgery.publish.files",
}

__all__ = sorted(_API)


__getattr__, __dir__ = lazy_exports(__name__, _API, globals())
