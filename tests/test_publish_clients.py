"""What users of a published checkpoint run, each in a fresh process without lns_surgery: the card's
own snippet asks nothing on the terminal, the tokenizer is the stock one, adapters the tool writes load
with ``AutoPeftModelForCausalLM``, and `transformers serve` loads the folded form (not the custom-code
one, as the card says)."""

from __future__ import annotations

import json
import re
import shutil
import types

import pytest
from conftest import STORIES, run_fresh_python, shared_path

from lns_surgery.publish.card import render_model_card
from lns_surgery.publish.validate import check_checkpoint

REPO = "someone/stories260K-lns"
PROMPT = "Do you wish to run the custom code"


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    import lns_surgery

    root = tmp_path_factory.mktemp("clients")
    lns_surgery.convert(shared_path(STORIES), root / "lns")
    lns_surgery.convert(shared_path(STORIES), root / "folded", mode="fold")
    return root


def _card_snippet(folder) -> str:
    card = render_model_card(check_checkpoint(folder), REPO).text
    code = re.search(r"## How to load.*?```python\n(.*?)```", card, re.S).group(1)
    return code.replace(f'"{REPO}"', repr(str(folder)))


@pytest.mark.parametrize("kind", ["lns", "folded"])
def test_the_cards_snippet_runs_without_asking_anything(checkpoints, kind):
    """stdin is closed: a prompt would show its question and fail; nothing may be asked at all."""
    result = run_fresh_python(_card_snippet(checkpoints / kind) + "\nprint('generated:', type(tokenizer).__name__)\n",
                              timeout=180)
    assert result.returncode == 0, result.stderr[-2000:]
    assert PROMPT not in result.stdout + result.stderr
    assert "generated: TokenizersBackend" in result.stdout


def test_the_tokenizer_is_stock_and_loads_without_the_folders_code(checkpoints, tmp_path):
    """AutoTokenizer (and AutoProcessor) ask on the terminal only when trust_remote_code is left unset,
    because finding the tokenizer reads the config, which is custom code. With the flag either way,
    nothing is asked; without running code they give the base model's own tokenizer."""
    folder = tmp_path / "lns"
    shutil.copytree(checkpoints / "lns", folder)
    configuration = folder / "configuration_lns.py"
    configuration.write_text("raise RuntimeError('the folder code ran')\n" + configuration.read_text())
    result = run_fresh_python(f"""
        from transformers import AutoProcessor, AutoTokenizer
        tokenizer = AutoTokenizer.from_pretrained({str(folder)!r}, trust_remote_code=False)
        processor = AutoProcessor.from_pretrained({str(folder)!r}, trust_remote_code=False)
        print("classes:", type(tokenizer).__module__, type(tokenizer).__name__, type(processor).__name__)
        print("ids:", tokenizer("Once upon a time")["input_ids"])
    """, timeout=180)
    assert result.returncode == 0, result.stderr[-2000:]
    assert PROMPT not in result.stdout + result.stderr and "the folder code ran" not in result.stderr
    assert "classes: transformers.tokenization_utils_tokenizers TokenizersBackend TokenizersBackend" in result.stdout
    from transformers import AutoTokenizer

    expected = AutoTokenizer.from_pretrained(shared_path(STORIES))("Once upon a time")["input_ids"]
    assert f"ids: {expected}" in result.stdout


def test_an_adapter_without_a_task_type_in_the_recipe_loads_with_auto_peft(checkpoints, tmp_path):
    """A recipe may set lora_task_type: null; the adapter still says CAUSAL_LM, without which
    AutoPeftModelForCausalLM refuses any base whose class is custom code."""
    from peft import get_peft_model
    from trl import ModelConfig

    import lns_surgery
    from lns_surgery.training.run import _peft_config

    model = lns_surgery.load_model(checkpoints / "lns")
    recipe = ModelConfig(use_peft=True, lora_task_type=None, lora_target_modules="all-linear", lora_dropout=0.0)
    peft_config = _peft_config(types.SimpleNamespace(train_norms=False), recipe, model)
    assert peft_config.task_type == "CAUSAL_LM"
    adapter = tmp_path / "adapter"
    get_peft_model(model, peft_config).save_pretrained(adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["task_type"] == "CAUSAL_LM" and config["base_model_name_or_path"] == str(checkpoints / "lns")
    without = tmp_path / "without-task-type"
    shutil.copytree(adapter, without)
    (without / "adapter_config.json").write_text(json.dumps(dict(config, task_type=None)))

    result = run_fresh_python(f"""
        import torch
        from peft import AutoPeftModelForCausalLM
        model = AutoPeftModelForCausalLM.from_pretrained({str(adapter)!r}, trust_remote_code=True)
        print("loaded:", type(model.get_base_model()).__name__, tuple(model(torch.tensor([[1, 403, 407]])).logits.shape))
        try:
            AutoPeftModelForCausalLM.from_pretrained({str(without)!r}, trust_remote_code=True)
        except ValueError as exc:
            print("without a task type:", str(exc).splitlines()[0])
    """, timeout=180)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "loaded: LNSLlamaForCausalLM (1, 3, 512)" in result.stdout
    assert "without a task type: " in result.stdout  # refused: why the task type is set


def test_transformers_serve_loads_the_folded_form_not_the_custom_code_one(checkpoints):
    """`transformers serve` takes the class named in `architectures` from transformers itself; its loader
    needs no server packages to be asked directly."""
    result = run_fresh_python(f"""
        from transformers.cli.serving.model_manager import ModelLoader
        loader = ModelLoader(device="cpu", dtype="float32", trust_remote_code=True)
        print("folded:", type(loader._load_model({str(checkpoints / "folded")!r})).__name__)
        try:
            loader._load_model({str(checkpoints / "lns")!r})
        except AttributeError as exc:
            print("custom code:", exc)
    """, timeout=180)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "folded: LlamaForCausalLM" in result.stdout
    assert "custom code: module transformers has no attribute LNSLlamaForCausalLM" in result.stdout
    card = render_model_card(check_checkpoint(checkpoints / "lns"), REPO).text
    serve = next(line for line in card.splitlines() if line.startswith("| transformers serve"))
    assert f"lns-surgery fold {REPO}" in serve and "cannot load this custom-code checkpoint" in serve
    folded = render_model_card(check_checkpoint(checkpoints / "folded"), REPO).text
    assert f"`transformers serve {REPO}`" in folded
