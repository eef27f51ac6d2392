"""Every registry architecture: LNS equals an independent reference, and the scaling is active.

In memory, after code-mode conversion on disk, after folding, after a save/load round trip, and in
a fresh process that can only use the checkpoint's own code.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import run_fresh_python
from lns_reference import EXPECTED_LAYOUT, hooked_reference
from tiny_models import VOCAB, tiny_model

import lns_surgery
from lns_surgery.conversion.registry import supported_architectures

# The families with a hand-written tiny config and layout; tests/test_zoo.py covers every other one.
MODEL_TYPES = [arch.model_type for arch in supported_architectures() if arch.model_type in EXPECTED_LAYOUT]
TOLERANCE = 1e-5  # fp32


def _ids():
    return torch.randint(3, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _max_diff(a, b) -> float:
    return (a - b).abs().max().item()


@pytest.mark.floor
@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_in_memory_scaling_matches_reference(model_type):
    stock = tiny_model(model_type)
    ids = _ids()
    base = _logits(stock, ids)
    with hooked_reference(stock, model_type):
        reference = _logits(stock, ids)
    lns = lns_surgery.apply_layernorm_scaling(copy.deepcopy(stock))
    scaled = _logits(lns, ids)
    assert _max_diff(scaled, reference) <= TOLERANCE
    assert _max_diff(scaled, base) > 1e-3, "the scaling must be active"
    # The first block is untouched, deeper blocks get 1/sqrt(l).
    layers_path, norms = EXPECTED_LAYOUT[model_type]
    blocks = lns.get_submodule(layers_path)
    assert [blocks[i].get_submodule(norms[0]).lns_scale for i in range(len(blocks))] == pytest.approx(
        [1 / (i + 1) ** 0.5 for i in range(len(blocks))]
    )
    # Same parameters, same names: PEFT targets and state dicts keep working.
    assert list(lns.state_dict()) == list(stock.state_dict())
    # Applying twice never scales twice.
    assert torch.equal(_logits(lns_surgery.apply_layernorm_scaling(lns), ids), scaled)


@pytest.mark.floor
@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_checkpoint_modes_match_reference(model_type, tmp_path):
    stock = tiny_model(model_type)
    stock.save_pretrained(tmp_path / "stock")
    ids = _ids()
    with hooked_reference(stock, model_type):
        reference = _logits(stock, ids)

    lns_surgery.convert(tmp_path / "stock", tmp_path / "lns")
    config = json.loads((tmp_path / "lns" / "config.json").read_text())
    assert config["model_type"] == f"lns_{model_type}" and config["lns"]["alpha"] == 1.0
    loaded = lns_surgery.load_model(tmp_path / "lns").eval()
    code_logits = _logits(loaded, ids)
    assert _max_diff(code_logits, reference) <= TOLERANCE

    # Weights are untouched in code mode.
    assert (tmp_path / "lns" / "model.safetensors").read_bytes() == (tmp_path / "stock" / "model.safetensors").read_bytes()

    # Save/load round trip of the LNS model is exact.
    loaded.save_pretrained(tmp_path / "resaved")
    again = lns_surgery.load_model(tmp_path / "resaved").eval()
    assert torch.equal(_logits(again, ids), code_logits)

    # Tied embeddings stay tied.
    if getattr(stock.config, "tie_word_embeddings", False):
        assert loaded.get_output_embeddings().weight.data_ptr() == loaded.get_input_embeddings().weight.data_ptr()

    if config["lns"]["fold_rule"] is None:  # OLMo's norm has no parameters to carry the scale
        with pytest.raises(lns_surgery.LNSError, match="cannot be folded exactly into the weights of OlmoLayerNorm"):
            lns_surgery.convert(tmp_path / "stock", tmp_path / "folded", mode="fold")
        with pytest.raises(lns_surgery.LNSError, match="cannot be folded exactly"):
            lns_surgery.fold(tmp_path / "lns", tmp_path / "folded")
        assert not (tmp_path / "folded").exists()
        return
    # Fold mode: stock classes, same function within rounding; from the stock or from the LNS checkpoint.
    from transformers import AutoModelForCausalLM

    lns_surgery.convert(tmp_path / "stock", tmp_path / "folded", mode="fold")
    lns_surgery.fold(tmp_path / "lns", tmp_path / "folded2")
    for name in ("folded", "folded2"):
        folded = AutoModelForCausalLM.from_pretrained(tmp_path / name).eval()
        assert not lns_surgery.is_lns_model(folded) and type(folded).__name__ == type(stock).__name__
        assert _max_diff(_logits(folded, ids), code_logits) <= TOLERANCE


def test_fresh_process_loads_every_architecture_from_its_own_code(tmp_path):
    """No lns_surgery in the loading process: only transformers and the checkpoint's files."""
    ids = _ids()
    torch.save(ids, tmp_path / "ids.pt")
    for model_type in MODEL_TYPES:
        stock = tiny_model(model_type)
        stock.save_pretrained(tmp_path / "stock" / model_type)
        lns_surgery.convert(tmp_path / "stock" / model_type, tmp_path / "lns" / model_type)
        with hooked_reference(stock, model_type):
            torch.save(_logits(stock, ids), tmp_path / f"{model_type}.pt")
    result = run_fresh_python(
        f"""
        import json, torch
        from transformers import AutoConfig, AutoModel, AutoModelForCausalLM
        ids = torch.load("ids.pt")
        report = {{}}
        for model_type in {MODEL_TYPES!r}:
            path = "lns/" + model_type
            config = AutoConfig.from_pretrained(path, trust_remote_code=True)
            model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True).eval()
            bare = AutoModel.from_pretrained(path, trust_remote_code=True)
            with torch.no_grad():
                diff = (model(input_ids=ids).logits - torch.load(model_type + ".pt")).abs().max().item()
            report[model_type] = [type(config).__name__, type(model).__name__, type(bare).__name__,
                                  type(model).__module__.startswith("transformers_modules"), diff]
        print(json.dumps(report))
        """,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    for model_type, (config_name, model_name, bare_name, remote, diff) in report.items():
        assert config_name.startswith("LNS") and model_name.startswith("LNS") and bare_name.startswith("LNS"), model_type
        assert remote, f"{model_type} did not load through remote code"
        assert diff <= TOLERANCE, f"{model_type}: {diff}"
