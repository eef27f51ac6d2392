"""Built-in models, named ``builtin:NAME`` wherever a model path is accepted: they need no network.

``tiny-llama`` is built on first use from a fixed seed (random weights, for plumbing checks);
``demo`` is the small pretrained Llama that ships with the package (see scripts/train_demo_base.py).
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

from lns_surgery.errors import LNSError

PREFIX = "builtin:"


def cache_dir() -> Path:
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


def _demo(folder: Path) -> Path:
    shipped = resources.files("lns_surgery.demo").joinpath("base_model")
    if not shipped.joinpath("config.json").is_file():
        raise LNSError("this installation does not include the demo base model")
    return Path(str(shipped))


def builtin_path(name: str) -> Path:
    """The folder of built-in model ``name`` (built into the cache on first use)."""
    if name == "demo":
        return _demo(cache_dir())
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
