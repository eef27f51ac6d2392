"""A folded checkpoint carries its scales into GGUF (the llama.cpp format) untouched.

llama.cpp runs no custom code, so the fold-mode checkpoint is the way LNS reaches it, and the folded
norm tensors must arrive in the GGUF exactly. What this file can check without building llama.cpp:

- always (the ``gguf`` package only): the folded stories260K checkpoint, with every tensor named by
  llama.cpp's own tensor-name table for Llama (``gguf.get_tensor_name_map``, the table its
  ``convert_hf_to_gguf.py`` maps names with) and written and read back with gguf's writer and
  reader, differs from the original's GGUF in exactly the ``blk.N.attn_norm`` and
  ``blk.N.ffn_norm`` tensors, which hold ``w / sqrt(N + 1)``. That covers the fold and the naming
  and serialisation, not the converter's per-architecture code (which for Llama copies norm tensors
  as they are).
- where llama.cpp's converter has been set up (``scripts/check_runtimes.py --llama-cpp`` leaves it,
  with a Python that has its requirements, in its runtimes folder; or point ``LNS_LLAMA_CPP_CONVERTER``
  and ``LNS_LLAMA_CPP_PYTHON`` at them): the real ``convert_hf_to_gguf.py`` writes the same norm
  tensors bit for bit, and refuses the code-mode checkpoint's custom architecture instead of
  converting it as the stock model. Skipped elsewhere: the converter is not on PyPI on its own.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
from safetensors.numpy import load_file  # noqa: E402

import lns_surgery  # noqa: E402

BLOCK_NORM = re.compile(r"blk\.(\d+)\.(attn_norm|ffn_norm)\.weight")


def _safetensors(folder: Path) -> dict:
    tensors = {}
    for shard in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(shard))
    return tensors


def _write_gguf_like_llama_cpp(folder: Path, out: Path) -> None:
    """Every tensor of a Llama checkpoint under llama.cpp's GGUF name, as f32."""
    config = json.loads((folder / "config.json").read_text())
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config["num_hidden_layers"])
    writer = gguf.GGUFWriter(out, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    for name, tensor in sorted(_safetensors(folder).items()):
        gguf_name = names.get_name(name, try_suffixes=(".weight", ".bias"))
        assert gguf_name is not None, f"llama.cpp's name table has no entry for {name}"
        writer.add_tensor(gguf_name, np.ascontiguousarray(tensor, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _gguf_tensors(path: Path) -> dict:
    return {tensor.name: np.array(tensor.data) for tensor in gguf.GGUFReader(path).tensors}


def _check_block_norms(gguf_tensors: dict, folded: dict, original: dict, num_layers: int) -> None:
    """Each block norm tensor in the GGUF is the folded one, bit for bit, and that is w / sqrt(l)."""
    kinds = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}
    found = set()
    for name, data in gguf_tensors.items():
        match = BLOCK_NORM.fullmatch(name)
        if not match:
            continue
        block, kind = int(match.group(1)), match.group(2)
        source = f"model.layers.{block}.{kinds[kind]}.weight"
        assert np.array_equal(data.reshape(folded[source].shape), folded[source]), name
        expected = original[source].astype(np.float64) / np.sqrt(block + 1)
        np.testing.assert_allclose(data.astype(np.float64).reshape(expected.shape), expected, rtol=1e-6, atol=0)
        found.add(name)
    assert len(found) == 2 * num_layers


@pytest.fixture(scope="module")
def stories_checkpoints(tmp_path_factory):
    from conftest import STORIES, shared_path

    stories = shared_path(STORIES)
    out = tmp_path_factory.mktemp("gguf")
    fold = lns_surgery.convert(stories, out / "fold", mode="fold")
    code = lns_surgery.convert(stories, out / "code", mode="code")
    return {"original": Path(stories), "fold": Path(fold), "code": Path(code), "work": out}


def test_folded_norm_tensors_reach_the_gguf_exactly(stories_checkpoints):
    work = stories_checkpoints["work"]
    num_layers = json.loads((stories_checkpoints["original"] / "config.json").read_text())["num_hidden_layers"]
    _write_gguf_like_llama_cpp(stories_checkpoints["original"], work / "original.gguf")
    _write_gguf_like_llama_cpp(stories_checkpoints["fold"], work / "fold.gguf")
    original_gguf, folded_gguf = _gguf_tensors(work / "original.gguf"), _gguf_tensors(work / "fold.gguf")
    folded, original = _safetensors(stories_checkpoints["fold"]), _safetensors(stories_checkpoints["original"])

    _check_block_norms(folded_gguf, folded, original, num_layers)
    assert folded_gguf.keys() == original_gguf.keys()
    changed = {name for name in folded_gguf if not np.array_equal(folded_gguf[name], original_gguf[name])}
    # Block 1's scale is 1: its norms are unchanged; every other block norm, and nothing else, differs.
    assert changed == {f"blk.{b}.{kind}.weight" for b in range(1, num_layers) for kind in ("attn_norm", "ffn_norm")}


def _llama_cpp_converter() -> tuple[Path, Path] | None:
    """llama.cpp's convert_hf_to_gguf.py and a Python that can run it, where they have been set up."""
    runtimes = Path(os.environ.get("LNS_RUNTIMES_DIR", "~/.cache/lns-surgery-runtimes")).expanduser()
    script = os.environ.get("LNS_LLAMA_CPP_CONVERTER") or next(
        iter(sorted(runtimes.glob("llama.cpp-converter-*/convert_hf_to_gguf.py"))), None)
    python = os.environ.get("LNS_LLAMA_CPP_PYTHON") or runtimes / "llama-cpp-venv" / "bin" / "python"
    if script and Path(script).exists() and Path(python).exists():
        return Path(script), Path(python)
    return None


def _convert(converter, folder: Path, out: Path) -> subprocess.CompletedProcess:
    script, python = converter
    return subprocess.run([str(python), str(script), str(folder), "--outfile", str(out), "--outtype", "f32"],
                          capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=300)


@pytest.mark.skipif(_llama_cpp_converter() is None, reason="llama.cpp's convert_hf_to_gguf.py is not set up here "
                    "(scripts/check_runtimes.py --llama-cpp sets it up)")
def test_llama_cpp_converter_keeps_folded_norms_and_refuses_code_mode(stories_checkpoints):
    converter, work = _llama_cpp_converter(), stories_checkpoints["work"]
    num_layers = json.loads((stories_checkpoints["original"] / "config.json").read_text())["num_hidden_layers"]
    result = _convert(converter, stories_checkpoints["fold"], work / "converted-fold.gguf")
    assert result.returncode == 0, result.stderr[-2000:]
    _check_block_norms(_gguf_tensors(work / "converted-fold.gguf"), _safetensors(stories_checkpoints["fold"]),
                       _safetensors(stories_checkpoints["original"]), num_layers)

    refused = _convert(converter, stories_checkpoints["code"], work / "converted-code.gguf")
    assert refused.returncode != 0 and "LNSLlamaForCausalLM is not supported" in refused.stdout + refused.stderr
    assert not (work / "converted-code.gguf").exists()
