"""Loading checkpoints of any status (stock, LNS, folded) the same way."""

from __future__ import annotations

import json
from pathlib import Path

from lns_surgery.core.errors import LNSError, first_line
from lns_surgery.core.sources import resolve_builtin


def _config_dict(path: str | Path) -> dict | None:
    """The folder's config.json (None for a Hub id or a folder without one); broken JSON is one line."""
    config_path = Path(path) / "config.json"
    if not config_path.is_file():
        return None
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise LNSError(f"'{config_path}' is not valid JSON: {exc}") from None
    return config if isinstance(config, dict) else None


def _register_lns_classes(path) -> bool:
    """For an LNS checkpoint on disk, register this process's LNS classes for its ``model_type``; False
    only when it is LNS but its base model is itself custom code (then only remote code can load it)."""
    from lns_surgery.core.lns_status import lns_record_problem, lns_status
    from lns_surgery.modeling.auto import register

    config = _config_dict(path)
    if config is None:
        return True
    problem = lns_record_problem(config)
    if problem:
        raise LNSError(f"'{path}': {problem}")
    status = lns_status(config)
    if status.kind != "lns":
        return True
    return register(status.record) is not None


def load_model(path: str | Path, *, trust_remote_code: bool = False, **kwargs):
    """``AutoModelForCausalLM.from_pretrained`` that also loads LNS checkpoints without remote code.

    For an LNS checkpoint this process's own LNS classes are registered first, so nothing from the
    folder is executed; a checkpoint whose base model is itself custom code still needs
    ``trust_remote_code=True``.
    """
    from transformers import AutoModelForCausalLM

    path = resolve_builtin(path)
    if not _register_lns_classes(path) and not trust_remote_code:
        raise LNSError(f"'{path}' is built on custom code; pass trust_remote_code=True")
    from huggingface_hub.errors import StrictDataclassError

    from pickle import UnpicklingError

    try:
        return AutoModelForCausalLM.from_pretrained(path, trust_remote_code=trust_remote_code, **kwargs)
    except (UnpicklingError, EOFError) as exc:  # a pytorch_model.bin that is not plain tensors, or damaged
        raise LNSError(f"could not load a model from '{path}': its pickled weights (pytorch_model.bin) cannot be read "
                       f"safely ({first_line(exc)}); give a safetensors checkpoint") from None
    except (OSError, ValueError, TypeError, ImportError, StrictDataclassError) as exc:
        if "trust_remote_code" in str(exc) and not trust_remote_code:
            raise LNSError(f"'{path}' is defined by code inside the checkpoint; pass --trust-remote-code to run it "
                           "(read it first)") from None
        raise LNSError(f"could not load a model from '{path}': {first_line(exc)}") from None


def load_tokenizer(path: str | Path, **kwargs):
    from transformers import AutoTokenizer

    path = resolve_builtin(path)
    # AutoTokenizer reads config.json too: unregistered, an LNS model_type with an auto_map makes
    # transformers ask on the terminal whether to run the folder's code.
    _register_lns_classes(path)
    from huggingface_hub.errors import StrictDataclassError

    try:
        return AutoTokenizer.from_pretrained(path, **kwargs)
    except (OSError, ValueError, TypeError, StrictDataclassError) as exc:  # it reads config.json too
        raise LNSError(f"could not load a tokenizer from '{path}': {first_line(exc)}") from None
