"""The conversion-plan cache: a repeated conversion skips the family's modelling code and gives the
same checkpoint; anything that could change the plan changes its key."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import REPO_ROOT
from safetensors.torch import load_file
from tiny_models import tiny_model

import lns_surgery
from lns_surgery.conversion import convert as convert_module
from lns_surgery.conversion import plan_cache


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LNS_SURGERY_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("LNS_SURGERY_PLAN_CACHE")
    return tmp_path / "cache" / "plans"


@pytest.fixture(scope="module")
def stock(tmp_path_factory):
    folder = tmp_path_factory.mktemp("stock") / "llama"
    tiny_model("llama").save_pretrained(folder)
    return folder


def _refuse_to_plan(*args, **kwargs):
    raise AssertionError("the plan was computed again although an identical one is cached")


@pytest.mark.parametrize("mode", ["code", "fold"])
def test_a_cached_plan_gives_the_same_checkpoint_without_building_the_model(stock, cache, tmp_path, monkeypatch, mode):
    first = lns_surgery.convert(stock, tmp_path / "first", mode=mode)
    assert len(list(cache.glob("*.json"))) == 1
    monkeypatch.setattr(convert_module, "architecture_for_checkpoint", _refuse_to_plan)
    second = lns_surgery.convert(stock, tmp_path / "second", mode=mode)
    first_config, second_config = (json.loads((folder / "config.json").read_text()) for folder in (first, second))
    assert first_config == second_config
    first_weights, second_weights = load_file(first / "model.safetensors"), load_file(second / "model.safetensors")
    assert first_weights.keys() == second_weights.keys()
    for key in first_weights:
        assert torch.equal(first_weights[key], second_weights[key]), key
    if mode == "fold":  # the cached plan really folded: norm weights differ from the input's
        original = load_file(stock / "model.safetensors")
        assert not torch.equal(second_weights["model.layers.1.input_layernorm.weight"], original["model.layers.1.input_layernorm.weight"])


def test_a_code_mode_plan_is_completed_for_fold_mode(stock, cache, tmp_path):
    lns_surgery.convert(stock, tmp_path / "code")
    key = next(cache.glob("*.json"))
    assert json.loads(key.read_text())["fold_tensors"] is None
    lns_surgery.convert(stock, tmp_path / "fold", mode="fold")
    assert json.loads(key.read_text())["fold_tensors"][1] == [
        ["weight", "model.layers.1.input_layernorm.weight"], ["weight", "model.layers.1.post_attention_layernorm.weight"]]


def _key(stock, **changes):
    config = json.loads((stock / "config.json").read_text())
    arguments = {"config_dict": config, "tensor_names": ["a", "b"], "layers": None, "norms": None}
    arguments.update(changes)
    return plan_cache.plan_key(**arguments)


def test_everything_a_plan_depends_on_changes_its_key(stock, cache, monkeypatch):
    import transformers

    config = json.loads((stock / "config.json").read_text())
    base = _key(stock)
    assert base == _key(stock)
    variants = {
        "config": _key(stock, config_dict={**config, "num_hidden_layers": 3}),
        "tensor names": _key(stock, tensor_names=["a", "c"]),
        "layers": _key(stock, layers="model.layers"),
        "norms": _key(stock, norms=["input_layernorm"]),
    }
    monkeypatch.setattr(transformers, "__version__", transformers.__version__ + ".edited")
    variants["transformers version"] = _key(stock)
    monkeypatch.setattr(transformers, "__version__", transformers.__version__[: -len(".edited")])
    monkeypatch.setattr(plan_cache, "_file_digest", lambda path: "edited " + path.name)
    variants["modelling file"] = _key(stock)
    monkeypatch.setattr(plan_cache, "_tool_digest", lambda: "another lns-surgery")
    variants["tool code"] = _key(stock)
    for what, key in variants.items():
        assert key is not None and key != base, what
    assert len(set(variants.values())) == len(variants)


def test_custom_code_and_a_disabled_cache_are_never_cached(stock, cache, monkeypatch):
    config = json.loads((stock / "config.json").read_text())
    assert _key(stock, config_dict={**config, "auto_map": {"AutoConfig": "configuration_x.XConfig"}}) is None
    monkeypatch.setenv("LNS_SURGERY_PLAN_CACHE", "off")
    assert _key(stock) is None


def test_a_damaged_entry_is_recomputed(stock, cache, tmp_path):
    lns_surgery.convert(stock, tmp_path / "first")
    entry = next(cache.glob("*.json"))
    expected = json.loads(entry.read_text())
    entry.write_text('{"format": 1, "arch": {"model_type": ')
    lns_surgery.convert(stock, tmp_path / "second")
    assert json.loads(entry.read_text()) == expected


def test_a_warm_conversion_never_imports_the_modelling_code(stock, tmp_path):
    """The point of the cache: the second process has no modelling module of the family loaded."""
    env = {key: value for key, value in os.environ.items() if key != "LNS_SURGERY_PLAN_CACHE"}
    env["LNS_SURGERY_CACHE"] = str(tmp_path / "cache")
    code = (
        "import sys, lns_surgery\n"
        "lns_surgery.convert(sys.argv[1], sys.argv[2])\n"
        "print('modeling_llama' in ' '.join(sys.modules))\n"
    )
    loaded = []
    for name in ("cold", "warm"):
        result = subprocess.run([sys.executable, "-c", code, str(stock), str(tmp_path / name)], env=env, cwd=REPO_ROOT,
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr
        loaded.append(result.stdout.split()[-1])
    assert loaded == ["True", "False"]
    assert (tmp_path / "warm" / "config.json").read_text() == (tmp_path / "cold" / "config.json").read_text()
