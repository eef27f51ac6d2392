"""An LNS checkpoint in the hands of PEFT and TRL alone: a LoRA adapter trained on converted stories260K
loads with ``AutoPeftModelForCausalLM`` in a process without lns_surgery, and TRL's own ``trl sft``
command fine-tunes a converted checkpoint into one that is still LNS. Each is checked against an
independent reference: the stock Llama with forward hooks that scale the pre-sublayer norms."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import lns_surgery
from conftest import run_fresh_python, shared_path
from lns_reference import hooked_reference

# BOS first (the tokenizer does not add it), then a few ordinary TinyStories tokens.
IDS = [1, 403, 407, 261, 378, 430, 426, 271, 259, 417, 302, 329]


@pytest.fixture(scope="module")
def lns_stories(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("stories-lns") / "lns"
    return lns_surgery.convert(shared_path("models/stories260K"), out)


def _logits(model) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(torch.tensor([IDS])).logits[0]


def _fresh_process_logits(loader: str, path: Path) -> dict:
    """Logits of ``path`` loaded by ``loader`` (``"AutoModelForCausalLM"`` from transformers or
    ``"AutoPeftModelForCausalLM"`` from peft) with remote code, in a new interpreter where
    ``import lns_surgery`` fails."""
    module = "peft" if loader.startswith("AutoPeft") else "transformers"
    result = run_fresh_python(f"""
        import json, torch
        from {module} import {loader}
        model = {loader}.from_pretrained({str(path)!r}, trust_remote_code=True).eval()
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        with torch.no_grad():
            logits = model(torch.tensor([{IDS!r}])).logits[0]
        print(json.dumps({{"class": type(model).__name__, "base_class": type(base).__name__,
                          "base_module": type(base).__module__, "lns": base.config.lns,
                          "logits": logits.tolist()}}))
    """)
    assert result.returncode == 0, result.stderr[-3000:]
    loaded = json.loads(result.stdout.strip().splitlines()[-1])
    loaded["logits"] = torch.tensor(loaded["logits"])
    return loaded


def _stock_llama(weights_dir: Path):
    """The stock ``LlamaForCausalLM`` of stories260K holding the weights saved in ``weights_dir``."""
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(str(shared_path("models/stories260K")))
    state = load_file(str(weights_dir / "model.safetensors"))
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)  # lm_head is tied
    return model.eval()


@pytest.mark.slow
def test_lora_adapter_loads_with_auto_peft_in_a_fresh_process(lns_stories, tmp_path):
    from peft import PeftModel

    from lns_surgery.training import train_from_dict

    result = train_from_dict({
        "model_name_or_path": str(lns_stories), "output_dir": str(tmp_path / "out"), "export": "adapter",
        "dataset_name": str(shared_path("data/alpaca/alpaca_first100.json")), "max_length": 128, "max_steps": 3,
        "per_device_train_batch_size": 4, "learning_rate": 1e-2, "lora_r": 4, "lora_dropout": 0.0, "seed": 0,
        "activation_checkpointing": False, "use_cpu": True, "report_to": "none", "disable_tqdm": True,
    }, "sft")
    adapter = result.output_dir / "adapter"
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == str(lns_stories)
    in_process = _logits(result.model)

    fresh = _fresh_process_logits("AutoPeftModelForCausalLM", adapter)
    assert fresh["class"] == "PeftModelForCausalLM" and fresh["base_class"] == "LNSLlamaForCausalLM"
    assert fresh["base_module"].startswith("transformers_modules."), fresh["base_module"]  # the checkpoint's own code
    assert fresh["lns"]["alpha"] == 1.0
    torch.testing.assert_close(fresh["logits"], in_process, atol=1e-5, rtol=1e-5)

    # Independently: the stock Llama plus the same adapter, with the norms scaled by hooks.
    reference = PeftModel.from_pretrained(_stock_llama(lns_stories), str(adapter)).eval()
    with hooked_reference(reference.get_base_model(), "llama"):
        expected = _logits(reference)
    torch.testing.assert_close(fresh["logits"], expected, atol=1e-5, rtol=1e-5)
    # The adapter was trained (it changes the function) and the scaling is on (the unhooked stock differs).
    off_untrained = (fresh["logits"] - _logits(lns_surgery.load_model(str(lns_stories)))).abs().max()
    off_stock = (fresh["logits"] - _logits(reference)).abs().max()
    assert off_untrained > 1e-2 and off_stock > 1e-1
    print(f"\nAutoPeft in a fresh process: max |diff| {(fresh['logits'] - in_process).abs().max():.2e} from the "
          f"model in memory, {(fresh['logits'] - expected).abs().max():.2e} from the hooked stock + adapter; "
          f"{off_stock:.3f} from the unhooked stock + adapter, {off_untrained:.3f} from the untrained LNS model",
          file=sys.stderr)


def _trl_command() -> list[str]:
    """TRL's ``trl`` command of this interpreter (its console script, else the same entry point)."""
    script = Path(sys.executable).with_name("trl")
    if script.is_file():
        return [str(script)]
    return [sys.executable, "-c", "import sys; from trl.cli.main import main; sys.exit(main())"]


@pytest.mark.slow
def test_trl_sft_command_trains_a_converted_checkpoint_that_stays_lns(lns_stories, tmp_path):
    records = json.loads(shared_path("data/alpaca/alpaca_first100.json").read_text(encoding="utf-8"))[:16]
    data = tmp_path / "alpaca-prompt-completion"  # load_dataset takes a folder of data files
    data.mkdir()
    (data / "train.jsonl").write_text("".join(
        json.dumps({"prompt": f"### Instruction:\n{r['instruction']}\n\n### Response:\n", "completion": r["output"]}) + "\n"
        for r in records))
    out = tmp_path / "sft"
    command = _trl_command() + [
        "sft", "--model_name_or_path", str(lns_stories), "--trust_remote_code", "--dataset_name", str(data),
        "--output_dir", str(out), "--max_steps", "2", "--per_device_train_batch_size", "4", "--max_length", "128",
        "--learning_rate", "1e-3", "--use_cpu", "--bf16", "false", "--report_to", "none", "--save_strategy", "no",
        "--seed", "0",
    ]
    run = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]

    config = json.loads((out / "config.json").read_text())
    source = json.loads((lns_stories / "config.json").read_text())
    assert config["model_type"] == "lns_llama" and config["lns"] == source["lns"]
    assert config["auto_map"] == source["auto_map"]
    assert {"configuration_lns.py", "modeling_lns.py", "lns_layers.py"} <= {p.name for p in out.iterdir()}
    trained, start = load_file(str(out / "model.safetensors")), load_file(str(lns_stories / "model.safetensors"))
    assert any(not torch.equal(trained[name], start[name]) for name in start)  # it trained

    fresh = _fresh_process_logits("AutoModelForCausalLM", out)
    assert fresh["base_class"] == "LNSLlamaForCausalLM" and fresh["base_module"].startswith("transformers_modules.")
    stock = _stock_llama(out)
    with hooked_reference(stock, "llama"):
        expected = _logits(stock)
    torch.testing.assert_close(fresh["logits"], expected, atol=1e-5, rtol=1e-5)
    off_stock = (fresh["logits"] - _logits(stock)).abs().max()
    assert off_stock > 1e-1  # the scaled norms are active
    print(f"\ntrl sft output in a fresh process: max |diff| {(fresh['logits'] - expected).abs().max():.2e} from the "
          f"hooked stock reference, {off_stock:.3f} from the unhooked stock model", file=sys.stderr)


def test_an_lns_tokenizer_loads_without_asking_to_run_code(lns_stories):
    """transformers reads config.json for the tokenizer too; with the LNS classes not yet registered in
    the process, the custom model_type made it ask on the terminal whether to run the folder's code."""
    result = run_fresh_python(f"""
        import lns_surgery
        tokenizer = lns_surgery.load_tokenizer({str(lns_stories)!r})
        print(tokenizer.decode(tokenizer(" Once upon a time")["input_ids"]).strip())
    """, block_lns_surgery=False)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == "Once upon a time"
    assert "custom code" not in result.stdout + result.stderr, result.stdout + result.stderr
