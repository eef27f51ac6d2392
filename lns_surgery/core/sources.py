"""What a model or data name points at: a ``builtin:`` model, a local path, or a Hugging Face Hub id.

Every stage resolves names through here, so that ``builtin:demo``, ``./my-model`` and
``Qwen/Qwen2.5-0.5B`` mean the same thing to ``convert``, ``analyze``, the trainer and ``push``.

Built-in models need no network: ``demo`` is the small pretrained Llama that ships with the package
(see scripts/train_demo_base.py); ``tiny-llama`` is built into the cache folder on first use from a
fixed seed (random weights, for plumbing checks).
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

from lns_surgery.core.errors import LNSError

BUILTIN_PREFIX = "builtin:"


def cache_dir() -> Path:
    """The package's cache folder: ``$LNS_SURGERY_CACHE``, else ``lns_surgery`` in the user's cache."""
    root = os.environ.get("LNS_SURGERY_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"), "lns_surgery")
    return Path(root)


def _tiny_llama(folder: Path) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=6,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         bos_token_id=1, eos_token_id=2, tie_word_embeddings=True)
    LlamaForCausalLM(config).save_pretrained(folder)


def _demo() -> Path:
    shipped = resources.files("lns_surgery.demo").joinpath("base_model")
    if not shipped.joinpath("config.json").is_file():
        raise LNSError("this installation does not include the demo base model")
    return Path(str(shipped))


def builtin_path(name: str) -> Path:
    """The folder of built-in model ``name`` (built into the cache on first use)."""
    if name == "demo":
        return _demo()
    builders = {"tiny-llama": _tiny_llama}
    if name not in builders:
        raise LNSError(f"unknown built-in model '{name}'; available: demo, {', '.join(builders)}")
    folder = cache_dir() / "builtin" / name
    if not (folder / "config.json").is_file():
        staging = folder.with_name(f".{name}.tmp-{os.getpid()}")
        builders[name](staging)
        staging.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.rename(staging, folder)
        except OSError:  # built concurrently by another process: keep theirs
            import shutil

            shutil.rmtree(staging, ignore_errors=True)
    return folder


def builtin_name(folder: str | os.PathLike) -> str | None:
    """``builtin:NAME`` when ``folder`` is a built-in model's folder (without building any), else None."""
    real = Path(folder).expanduser().resolve()
    candidates = {"demo": Path(str(resources.files("lns_surgery.demo").joinpath("base_model")))}
    candidates["tiny-llama"] = cache_dir() / "builtin" / "tiny-llama"
    for name, path in candidates.items():
        if path.resolve() == real:
            return BUILTIN_PREFIX + name
    return None


def resolve_builtin(name: str | os.PathLike):
    """``builtin:NAME`` becomes the built-in model's folder (a str); anything else is returned as it is."""
    if isinstance(name, str) and name.startswith(BUILTIN_PREFIX):
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
