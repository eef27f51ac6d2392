"""Loading checkpoints of any status (stock, LNS, folded) the same way."""

from __future__ import annotations

import json
from pathlib import Path

from lns_surgery.errors import LNSError


def _config_dict(path: str | Path) -> dict | None:
    config_path = Path(path) / "config.json"
    if config_path.is_file():
        return json.loads(config_path.read_text(encoding="utf-8"))
    return None


def load_model(path: str | Path, *, trust_remote_code: bool = False, **kwargs):
    """``AutoModelForCausalLM.from_pretrained`` that also loads LNS checkpoints without remote code.

    For an LNS checkpoint this process's own LNS classes are registered first, so nothing from the
    folder is executed; a checkpoint whose base model is itself custom code still needs
    ``trust_remote_code=True``.
    """
    from transformers import AutoModelForCausalLM

    from lns_surgery.modeling.auto import register

    path = _resolve_builtin(path)
    config = _config_dict(path)
    if config is not None and config.get("lns"):
        if register(config["lns"]) is None and not trust_remote_code:
            raise LNSError(f"'{path}' is built on custom code; pass trust_remote_code=True")
    try:
        return AutoModelForCausalLM.from_pretrained(path, trust_remote_code=trust_remote_code, **kwargs)
    except OSError as exc:
        raise LNSError(f"could not load a model from '{path}': {str(exc).strip().splitlines()[0]}") from None


def _resolve_builtin(path):
    if str(path).startswith("builtin:"):
        from lns_surgery.conversion.builtin import builtin_path

        return builtin_path(str(path)[len("builtin:"):])
    return path


def load_tokenizer(path: str | Path, **kwargs):
    from transformers import AutoTokenizer

    path = _resolve_builtin(path)
    try:
        return AutoTokenizer.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as exc:
        raise LNSError(f"could not load a tokenizer from '{path}': {str(exc).strip().splitlines()[0]}") from None
