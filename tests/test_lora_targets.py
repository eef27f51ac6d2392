"""LoRA adapts the same modules of an LNS checkpoint as of the stock one.

PEFT resolves targets by ``config.model_type`` (each method's default ``target_modules``; for
transformers 5's fused mixture-of-experts layers, which parameters "all-linear" stands for). An LNS
checkpoint's model_type is ``lns_<family>``: unknown to PEFT, it got attention-only LoRA from
"all-linear", without a warning. Checked with PEFT alone, in a process without lns_surgery loading the
checkpoint's own code, and through the tool's training path (``build_trainer`` with an sft recipe),
against the stock checkpoint of the same weights.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import torch
from tiny_models import tiny_config

import lns_surgery
from conftest import run_fresh_python, shared_path

# A dense family; three mixture-of-experts families PEFT maps (qwen3_moe and olmoe through transformers'
# conversion-pattern table, mixtral through an entry of PEFT's own); one it does not map (qwen2_moe).
FAMILIES = ["llama", "qwen3_moe", "mixtral", "olmoe", "qwen2_moe"]
MAPPED_MOE = ["qwen3_moe", "mixtral", "olmoe"]
VOCAB = 512  # stories260K's tokenizer, which the training-path check uses


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict:
    """family -> (stock folder, code-mode LNS folder converted from it)."""
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("lora-targets")
    out = {}
    for family in FAMILIES:
        config = tiny_config(family)
        config.vocab_size = VOCAB
        torch.manual_seed(0)
        stock = root / family
        AutoModelForCausalLM.from_config(config).save_pretrained(stock)
        out[family] = (stock, lns_surgery.convert(stock, root / f"{family}-lns"))
    return out


def _targets(peft_model) -> dict:
    base = peft_model.base_model
    return {
        "modules": sorted(base.targeted_module_names),
        "parameters": sorted(getattr(base, "targeted_parameter_names", [])),
        "lora_parameters": sum(p.numel() for name, p in peft_model.named_parameters() if "lora_" in name),
    }


_FRESH = """
    import json
    from transformers import AutoModelForCausalLM

    def lora(path, **config):
        model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)
        from peft import LoraConfig, get_peft_model  # imported only once the first checkpoint has loaded
        try:
            peft_model = get_peft_model(model, LoraConfig(r=4, **config))
        except ValueError as exc:  # PEFT has no default targets for this model type
            return {"model_type": model.config.model_type, "error": str(exc).splitlines()[0]}
        base = peft_model.base_model
        return {
            "model_type": model.config.model_type, "class_module": type(model).__module__,
            "modules": sorted(base.targeted_module_names),
            "parameters": sorted(getattr(base, "targeted_parameter_names", [])),
            "lora_parameters": sum(p.numel() for name, p in peft_model.named_parameters() if "lora_" in name),
        }

    results = {}
    for family, (stock, lns) in FOLDERS.items():
        # The LNS model first: the first family loads before anything here has imported PEFT.
        results[family] = {
            "lns": {"all-linear": lora(lns, target_modules="all-linear"), "default": lora(lns)},
            "stock": {"all-linear": lora(stock, target_modules="all-linear"), "default": lora(stock)},
        }
    print(json.dumps(results))
"""


def _resolution(result: dict) -> dict:
    return {key: value for key, value in result.items() if key not in ("model_type", "class_module")}


def test_peft_alone_targets_the_same_modules_as_on_the_stock_checkpoint(folders):
    paths = {family: [str(stock), str(lns)] for family, (stock, lns) in folders.items()}
    result = run_fresh_python(f"FOLDERS = {paths!r}\n" + textwrap.dedent(_FRESH))
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads(result.stdout.strip().splitlines()[-1])
    for family in FAMILIES:
        lns, stock = results[family]["lns"], results[family]["stock"]
        assert lns["all-linear"]["model_type"] == f"lns_{family}", family  # never the stock model_type
        assert lns["all-linear"]["class_module"].startswith("transformers_modules."), family  # the shipped code
        for config in ("all-linear", "default"):
            assert _resolution(lns[config]) == _resolution(stock[config]), (family, config)
    assert results["llama"]["lns"]["default"]["modules"]  # PEFT's default targets for llama, not an error
    for family in MAPPED_MOE:  # the experts are adapted, not only attention
        targets = results[family]["lns"]["all-linear"]
        assert any(name.endswith("experts.gate_up_proj") for name in targets["parameters"]), family
        assert any(name.endswith("experts.down_proj") for name in targets["parameters"]), family
    counts = {family: results[family]["lns"]["all-linear"]["lora_parameters"] for family in FAMILIES}
    print(f"\nLoRA all-linear parameters, LNS = stock: {counts}")


def _sft_recipe(model: Path, tmp_path: Path, **extra) -> dict:
    return {
        "model_name_or_path": str(model), "tokenizer_name_or_path": str(shared_path("models/stories260K")),
        "dataset_name": str(shared_path("data/alpaca/alpaca_first100.json")), "max_length": 64,
        "output_dir": str(tmp_path / "out"), "lora_r": 4, "lora_dropout": 0.0,  # PEFT has no dropout on experts
        "activation_checkpointing": False, "use_cpu": True, "report_to": "none", "disable_tqdm": True, "seed": 0,
        **extra,
    }


@pytest.mark.parametrize("family", ["llama", "qwen3_moe", "mixtral"])
def test_the_sft_recipe_targets_the_same_modules_as_on_the_stock_checkpoint(family, folders, tmp_path):
    from lns_surgery.training.recipe import recipe_from_dict
    from lns_surgery.training.run import build_trainer

    stock, lns = folders[family]
    runs = {
        "stock": _sft_recipe(stock, tmp_path),
        "lns checkpoint": _sft_recipe(lns, tmp_path),
        "lns_convert": _sft_recipe(stock, tmp_path, lns_convert=True),  # converted in this process, on load
    }
    targets = {}
    for name, settings in runs.items():
        trainer, info = build_trainer(recipe_from_dict(settings, "sft"))
        assert info["lora"]
        model_type = trainer.model.get_base_model().config.to_dict()["model_type"]  # as saved, as PEFT reads it
        assert model_type == (family if name == "stock" else f"lns_{family}"), name
        targets[name] = _targets(trainer.model)
    assert targets["lns checkpoint"] == targets["stock"]
    assert targets["lns_convert"] == targets["stock"]
    if family in MAPPED_MOE:
        assert any(name.endswith("experts.gate_up_proj") for name in targets["lns checkpoint"]["parameters"])


def test_lora_dropout_on_fused_experts_is_one_line(folders, tmp_path):
    """TRL's default lora_dropout (0.05) cannot apply to fused expert parameters; PEFT says so with a
    ValueError from inside the trainer's set-up. The stock and the LNS checkpoint get the same line."""
    from lns_surgery.core.errors import LNSError
    from lns_surgery.training.recipe import recipe_from_dict
    from lns_surgery.training.run import build_trainer

    stock, lns = folders["qwen3_moe"]
    for model in (stock, lns):
        settings = _sft_recipe(model, tmp_path)
        del settings["lora_dropout"]
        with pytest.raises(LNSError, match="mixture-of-experts parameters cannot use dropout: set lora_dropout: 0"):
            build_trainer(recipe_from_dict(settings, "sft"))
    # Dropout stays allowed where every target is a module (a dense model; a family PEFT does not map).
    for family in ("llama", "qwen2_moe"):
        settings = _sft_recipe(folders[family][1], tmp_path, lora_dropout=0.05)
        trainer, info = build_trainer(recipe_from_dict(settings, "sft"))
        assert info["lora"] and _targets(trainer.model)["lora_parameters"] > 0
