"""What a model or data name points at: a ``builtin:`` model, a local path, or a Hugging Face Hub id.

Every stage resolves names through here, so that ``builtin:demo``, ``./my-model`` and
``Qwen/Qwen2.5-0.5B`` mean the same thing to ``convert``, ``analyze``, the trainer and ``push``.
"""

from __future__ import annotations

import os
from pathlib import Path

BUILTIN_PREFIX = "builtin:"


def resolve_builtin(name: str | os.PathLike):
    """``builtin:NAME`` becomes the built-in model's folder (a str); anything else is returned as it is."""
    if isinstance(name, str) and name.startswith(BUILTIN_PREFIX):
        from lns_surgery.conversion.builtin import builtin_path

        return str(builtin_path(name[len(BUILTIN_PREFIX):]))
    return name


def is_hub_id(name: str | os.PathLike) -> bool:
    """Whether ``name`` can only mean a Hub repository: a valid ``name`` or ``namespace/name`` (as
    huggingface_hub validates it) that is not a path on this machine and does not look like one."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    text = str(name)
    if not text.strip() or text.startswith((".", "/", "~")) or Path(text).expanduser().exists():
        return False
    try:
        validate_repo_id(text)
    except HFValidationError:
        return False
    return True
