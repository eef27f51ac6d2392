#!/usr/bin/env python
"""SmolLM2-135M-Instruct from the shared GGUF file as an ordinary fp32 safetensors folder.

    python scripts/prepare_smollm2.py out/smollm2-135m-instruct

``../shared/models/smollm2-135m-instruct-gguf`` holds the real 30-block model as a Q4_1 GGUF file;
transformers dequantises it on load (~40 s on 2 cores, needs the ``gguf`` package). The folder this
writes (~540 MB) is what ``recipes/cpu/sft-smollm2-dolly.yaml``, the healing study and the runtime
checks read. With network, ``HuggingFaceTB/SmolLM2-135M-Instruct`` from the Hub is the same model at
full precision.

A folder that already holds the prepared model is reused; the folder appears only once complete.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("LNS_SHARED_DIR", REPO_ROOT.parent / "shared"))
SMOLLM2_GGUF = SHARED / "models" / "smollm2-135m-instruct-gguf" / "SmolLM2-135M-Instruct.Q4_1.gguf"


class PrepareError(Exception):
    """A problem the user can fix (a missing GGUF file, a folder that is something else)."""


def prepare_smollm2(folder: Path, gguf: Path = SMOLLM2_GGUF, quiet: bool = False) -> Path:
    """Write SmolLM2-135M-Instruct into ``folder`` once (reused when already there); returns ``folder``."""
    folder = Path(folder).expanduser()
    if (folder / "config.json").is_file() and (folder / "model.safetensors").is_file():
        if not quiet:
            print(f"SmolLM2-135M already prepared in {folder}", flush=True)
        return folder
    if not gguf.is_file():
        raise PrepareError(f"the SmolLM2 GGUF file is not at '{gguf}' (set LNS_SHARED_DIR to the shared folder)")
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise PrepareError(f"'{folder}' exists and is not a prepared SmolLM2 folder; give an empty or new folder")

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.time()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # Dequantised to plain floats on load: drop the GGUF quantizer marks, which save_pretrained refuses
    # and other runtimes reject in the config.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    staging = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)  # this process's own leftover
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        if folder.exists():
            folder.rmdir()  # empty, checked above
        folder.parent.mkdir(parents=True, exist_ok=True)
        staging.rename(folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    if not quiet:
        print(f"prepared SmolLM2-135M in {folder} ({time.time() - started:.0f} s)", flush=True)
    return folder


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path, help="where to write the model (created; reused when already prepared)")
    parser.add_argument("--gguf", type=Path, default=SMOLLM2_GGUF, help="the GGUF file (default: %(default)s)")
    args = parser.parse_args(argv)
    try:
        prepare_smollm2(args.folder, args.gguf)
    except PrepareError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
