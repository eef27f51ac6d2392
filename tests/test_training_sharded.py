"""Sharded training on CPU: two gloo processes launched with the shipped FSDP2 and ZeRO-3 accelerate
configs, full fine-tuning and LoRA of a converted LNS model, compared with one process doing the same steps."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess

import pytest
import torch

from conftest import REPO_ROOT, STORIES, run_fresh_python, shared_path
from lns_surgery.core.errors import LNSError
from lns_surgery.modeling.lns_layers import layer_scale
from lns_surgery.training.run import train_from_dict

IDS = [1, 403, 407, 261, 378, 275, 261, 157, 29, 13]
NUM_LAYERS = 5  # stories260K
RAMP_STEPS, MAX_STEPS = 2, 3
LORA = {"use_peft": True, "lora_r": 4, "lora_alpha": 8, "lora_dropout": 0.0}  # dropout would differ per rank

# Runs on each rank: full fine-tuning, then LoRA, each rank writing what it saw to rank<r>-<mode>.json
# (scripts/gpu_check.sh launches the same script on one GPU).
RANK_SCRIPT = REPO_ROOT / "scripts" / "sharded_rank.py"


def _settings(stories_path, **extra):
    return {"model_name_or_path": str(stories_path), "lns_convert": True, "lns_ramp_steps": RAMP_STEPS,
            "dataset_name": str(shared_path("data/c4-sample/c4_sample300.jsonl")), "max_steps": MAX_STEPS,
            "max_length": 64, "learning_rate": 3e-3, "logging_steps": 1, "activation_checkpointing": False,
            "use_cpu": True, "report_to": "none", "disable_tqdm": True, "seed": 0, **extra}


def _logits(model):
    model.eval()
    with torch.no_grad():
        return model(torch.tensor([IDS])).logits[0]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """The same steps in one process with 4 sequences per step (two ranks take 2 each): logits and the
    saved full fine-tuning state dict."""
    from safetensors.torch import load_file

    out = tmp_path_factory.mktemp("one-process")
    reference = {}
    for mode, extra in (("full", {}), ("lora", LORA)):
        settings = _settings(shared_path(STORIES), per_device_train_batch_size=4, output_dir=str(out / mode), **extra)
        result = train_from_dict(settings, "pretrain")
        reference[mode] = _logits(result.model)
    reference["full_state_dict"] = load_file(out / "full" / "model.safetensors")
    return reference


def _launch(launcher, settings, tmp_path):
    if shutil.which("accelerate") is None:
        pytest.skip("the accelerate launcher is not on PATH")
    runs = tmp_path / launcher
    runs.mkdir()
    launched = subprocess.run(
        ["accelerate", "launch", "--config_file", str(REPO_ROOT / f"recipes/accelerate/{launcher}.yaml"),
         "--num_processes", "2", "--mixed_precision", "no", "--main_process_port", "0",
         str(RANK_SCRIPT), launcher, json.dumps(settings), str(runs), json.dumps(LORA)],
        capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)
    assert launched.returncode == 0, launched.stdout[-2000:] + launched.stderr[-4000:]
    return runs, {mode: [json.loads((runs / f"rank{rank}-{mode}.json").read_text()) for rank in (0, 1)]
                  for mode in ("full", "lora")}


def _assert_scales_intact(steps):
    """Every LNS norm keeps its scaled class and 1 + alpha (1/sqrt(l) - 1), from the start through the ramp."""
    assert [step["alpha"] for step in steps] == [0.0, 0.5, 1.0, 1.0]
    for step in steps:
        assert len(step["norms"]) == 2 * NUM_LAYERS
        for name, (layer, scale, scaled_class) in step["norms"].items():
            assert scaled_class, name
            assert scale == pytest.approx(layer_scale(layer, step["alpha"]), abs=1e-12), (name, step["alpha"])


def _assert_outputs_match(runs, seen, one_process, tolerance):
    from safetensors.torch import load_file

    # every rank kept the scales, and the ramp moved them together
    for ranks in seen.values():
        for rank in ranks:
            _assert_scales_intact(rank["steps"])
        assert ranks[0]["steps"] == ranks[1]["steps"]

    # the merged LoRA export was rebuilt from the base and the saved adapter, on the main process only
    lora = seen["lora"]
    assert lora[0]["rebuilds"] and lora[0]["load_calls"] == 2 and lora[1]["load_calls"] == 1
    assert lora[0]["final_class"] == "LNSLlamaForCausalLM" and lora[0]["final_whole"]
    assert lora[1]["final_class"] is None
    assert (runs / "lora" / "adapter" / "adapter_config.json").is_file()

    saved = load_file(runs / "full" / "model.safetensors")
    assert set(one_process["full_state_dict"]) <= set(saved)
    for name, tensor in one_process["full_state_dict"].items():
        torch.testing.assert_close(saved[name], tensor, rtol=tolerance, atol=tolerance, msg=name)
    if "lm_head.weight" in saved:  # gathered from the shards as its own tensor: it must still be the tied one
        assert torch.equal(saved["lm_head.weight"], saved["model.embed_tokens.weight"])

    # both outputs load with their own code alone, in a fresh process, and compute the one-process result
    fresh = run_fresh_python(f"""
        import json, torch
        from transformers import AutoModelForCausalLM
        out = {{}}
        for mode in ("full", "lora"):
            model = AutoModelForCausalLM.from_pretrained({str(runs)!r} + "/" + mode, trust_remote_code=True).eval()
            with torch.no_grad():
                logits = model(torch.tensor([{IDS!r}])).logits[0]
            out[mode] = {{"module": type(model).__module__, "alpha": model.config.lns["alpha"], "logits": logits.tolist()}}
        print(json.dumps(out))
    """)
    assert fresh.returncode == 0, fresh.stderr[-3000:]
    loaded = json.loads(fresh.stdout.strip().splitlines()[-1])
    for mode in ("full", "lora"):
        assert loaded[mode]["module"].startswith("transformers_modules") and loaded[mode]["alpha"] == 1.0
        torch.testing.assert_close(torch.tensor(loaded[mode]["logits"]), one_process[mode],
                                   rtol=10 * tolerance, atol=10 * tolerance, msg=mode)


@pytest.mark.slow
def test_fsdp2_on_cpu_matches_one_process(stories_path, tmp_path, one_process):
    # a checkpoint after step 2: the shipped config writes checkpoints sharded, the final model whole
    settings = _settings(stories_path, per_device_train_batch_size=2, save_strategy="steps", save_steps=2)
    runs, seen = _launch("fsdp", settings, tmp_path)
    for mode in ("full", "lora"):
        checkpoint = runs / mode / "checkpoints" / "checkpoint-2"
        for state in ("pytorch_model_fsdp_0", "optimizer_0"):  # one file per rank, model and optimizer
            shards = sorted(path.name for path in (checkpoint / state).glob("*.distcp"))
            assert shards == ["__0_0.distcp", "__1_0.distcp"], (mode, state, sorted(p.name for p in checkpoint.iterdir()))
        assert not (checkpoint / "model.safetensors").exists()  # nothing gathered on one process
    for mode, ranks in seen.items():
        for rank in ranks:
            # FSDP2 really ran: every parameter a DTensor shard, each decoder block its own FSDP unit
            # (found by class: the LNS model keeps the stock LlamaDecoderLayer)
            assert rank["distributed_type"] == "FSDP" and rank["is_fsdp_enabled"], mode
            assert rank["dtensor_params"] == rank["params"] > 0, mode
            assert rank["sharded_blocks"] == NUM_LAYERS and rank["block_classes"] == ["FSDPLlamaDecoderLayer"], mode
    _assert_outputs_match(runs, seen, one_process, tolerance=1e-5)


@pytest.mark.slow
def test_zero3_on_cpu_matches_one_process(stories_path, tmp_path, one_process):
    if importlib.util.find_spec("deepspeed") is None:
        pytest.skip("DeepSpeed is not installed (pip install -e '.[test]' brings it)")
    # no use_cpu: accelerate skips DeepSpeed under it; without a GPU the device is the CPU anyway
    settings = _settings(stories_path, per_device_train_batch_size=2)
    del settings["use_cpu"]
    runs, seen = _launch("zero3", settings, tmp_path)
    for mode, ranks in seen.items():
        for rank in ranks:
            # ZeRO-3 really ran: every parameter partitioned away between the steps
            assert rank["distributed_type"] == "DEEPSPEED" and rank["is_deepspeed_enabled"], mode
            assert rank["partitioned_params"] == rank["params"] > 0, mode
    # DeepSpeed reduces gradients in flat buckets: another summation order, which Adam's normalisation of
    # small gradients magnifies to ~1e-4 after three steps at lr 3e-3
    _assert_outputs_match(runs, seen, one_process, tolerance=3e-4)


def test_fsdp_without_a_launcher_is_refused(stories_path, tmp_path):
    settings = _settings(stories_path, per_device_train_batch_size=2, output_dir=str(tmp_path / "out"), fsdp=True)
    with pytest.raises(LNSError) as refused:
        train_from_dict(settings, "pretrain")
    message = str(refused.value)
    assert "\n" not in message
    assert message.startswith("the recipe's fsdp key asks for FSDP, but this run would train as a single unsharded process")
    assert "never on CPU" in message
    assert not (tmp_path / "out").exists()
