"""Distillation under the launchers users run it with, on CPU: two gloo processes with the shipped FSDP2
config (CPU-RAM-efficient loading on and off), ZeRO-3 and plain data parallel. On every rank the teacher
computes the source checkpoint's function (full fine-tuning: its own model, sharded where the student's
weights are; LoRA: the student with its adapter off), and the logged losses match one process doing the
same steps."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess

import pytest
import torch
import yaml

from conftest import REPO_ROOT, STORIES, shared_path

IDS = [1, 403, 407, 261, 378, 275, 261, 157, 29, 13]
RANK_SCRIPT = REPO_ROOT / "tests" / "distill_rank.py"
LORA = {"use_peft": True, "lora_r": 4, "lora_alpha": 8, "lora_dropout": 0.0}  # dropout would differ per rank
MODES = {"full": {}, "lora": LORA}


def _settings(stories_path, **extra):
    return {"model_name_or_path": str(stories_path), "lns_convert": True, "distill": True, "use_peft": False,
            "dataset_name": str(shared_path("data/c4-sample/c4_sample300.jsonl")), "max_train_samples": 40,
            "max_steps": 2, "max_length": 64, "learning_rate": 3e-3, "logging_steps": 1,
            "activation_checkpointing": False, "use_cpu": True, "report_to": "none", "disable_tqdm": True,
            "seed": 0, **extra}


@pytest.fixture(scope="module")
def source_logits():
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(shared_path(STORIES)).eval()
    with torch.no_grad():
        return model(torch.tensor([IDS])).logits[0]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """The logged per-step KL and LM losses of the same two steps in one process, 4 sequences a step."""
    from lns_surgery.training.run import train_from_dict

    out = tmp_path_factory.mktemp("one-process")
    logged = {}
    for mode, extra in MODES.items():
        settings = _settings(shared_path(STORIES), per_device_train_batch_size=4, output_dir=str(out / mode), **extra)
        history = train_from_dict(settings, "pretrain").trainer.state.log_history
        logged[mode] = {key: [entry[key] for entry in history if key in entry] for key in ("distill_loss", "lm_loss")}
    return logged


def _launch(launch_args, launcher, settings, tmp_path, modes):
    if shutil.which("accelerate") is None:
        pytest.skip("the accelerate launcher is not on PATH")
    runs = tmp_path / "ranks"
    runs.mkdir()
    launched = subprocess.run(
        ["accelerate", "launch", *launch_args, "--num_processes", "2", "--mixed_precision", "no",
         "--main_process_port", "0", str(RANK_SCRIPT), launcher, json.dumps(settings), str(runs), json.dumps(modes)],
        capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)
    assert launched.returncode == 0, launched.stdout[-2000:] + launched.stderr[-4000:]
    return {mode: [json.loads((runs / f"rank{rank}-{mode}.json").read_text()) for rank in (0, 1)] for mode in modes}


def _assert_teacher_is_the_source(seen, source_logits, one_process, tolerance):
    for mode, ranks in seen.items():
        for rank in ranks:
            # before training (after any broadcast of rank 0's weights) and after it
            for key in ("teacher_logits", "teacher_logits_after"):
                if rank[key] is not None:
                    torch.testing.assert_close(torch.tensor(rank[key]), source_logits, rtol=1e-6, atol=1e-5,
                                               msg=f"{mode} {key}")
            # the losses every rank logs are reduced across ranks: those of one process on the same sequences
            for key in ("distill_loss", "lm_loss"):
                assert rank[key] == pytest.approx(one_process[mode][key], rel=tolerance), (mode, key)
        assert ranks[0]["teacher_logits_after"] == ranks[1]["teacher_logits_after"]
        assert ranks[0]["distill_loss"][0] > 0  # full LNS from step 1: the student is not the teacher
    for rank in seen["full"]:
        assert rank["teacher_dtypes"] == ["torch.float32"]  # the training dtype of these runs
    if "lora" in seen:
        for rank in seen["lora"]:
            assert rank["lora"] and rank["teacher"]["params"] == 0  # no second copy of the weights


@pytest.mark.slow
@pytest.mark.parametrize("ram_efficient", [True, False], ids=["ram-efficient-loading", "every-rank-loads"])
def test_fsdp2_teacher_is_the_source_on_every_rank_and_sharded(stories_path, tmp_path, source_logits, one_process,
                                                                ram_efficient):
    config = yaml.safe_load((REPO_ROOT / "recipes/accelerate/fsdp.yaml").read_text())
    assert config["fsdp_config"]["fsdp_cpu_ram_efficient_loading"] is True  # the shipped setting, tested as it is
    config["fsdp_config"]["fsdp_cpu_ram_efficient_loading"] = ram_efficient
    config_file = tmp_path / "fsdp.yaml"
    config_file.write_text(yaml.safe_dump(config))
    # LoRA once, with the shipped setting: its teacher is the student, which the flag does not concern
    modes = MODES if ram_efficient else {"full": {}}
    seen = _launch(["--config_file", str(config_file)], "fsdp", _settings(stories_path, per_device_train_batch_size=2),
                   tmp_path, modes)
    ranks = seen["full"]
    for rank in ranks:
        assert rank["distributed_type"] == "FSDP"
        # sharded like the student: every parameter a DTensor, each rank holding half of the elements
        assert rank["teacher"]["dtensor"] == rank["teacher"]["params"] == rank["student"]["dtensor"] > 0
        assert rank["teacher"]["local_elements"] == rank["student"]["local_elements"]
    assert sum(rank["teacher"]["local_elements"] for rank in ranks) == ranks[0]["source_elements"]  # once in all
    _assert_teacher_is_the_source(seen, source_logits, one_process, tolerance=1e-5)


@pytest.mark.slow
def test_zero3_teacher_is_the_source_on_every_rank_and_partitioned(stories_path, tmp_path, source_logits,
                                                                    one_process):
    if importlib.util.find_spec("deepspeed") is None:
        pytest.skip("DeepSpeed is not installed (pip install -e '.[test]' brings it)")
    settings = _settings(stories_path, per_device_train_batch_size=2)
    del settings["use_cpu"]  # accelerate skips DeepSpeed under it; without a GPU the device is the CPU anyway
    seen = _launch(["--config_file", str(REPO_ROOT / "recipes/accelerate/zero3.yaml")], "zero3", settings, tmp_path,
                   MODES)
    for rank in seen["full"]:
        assert rank["distributed_type"] == "DEEPSPEED"
        # partitioned like the student: no rank holds a whole parameter between forwards
        assert rank["teacher"]["partitioned"] == rank["teacher"]["params"] == rank["student"]["partitioned"] > 0
        assert rank["teacher"]["local_elements"] == rank["student"]["local_elements"]
    # DeepSpeed reduces gradients in flat buckets: another summation order for step 2's weights
    _assert_teacher_is_the_source(seen, source_logits, one_process, tolerance=1e-4)


@pytest.mark.slow
def test_data_parallel_teacher_is_the_source_on_every_rank(stories_path, tmp_path, source_logits, one_process):
    # --multi_gpu selects the torchrun launcher; use_cpu in the recipe makes each rank use gloo on CPU
    seen = _launch(["--multi_gpu", "--num_machines", "1", "--dynamo_backend", "no"], "ddp",
                   _settings(stories_path, per_device_train_batch_size=2), tmp_path, MODES)
    for rank in seen["full"]:
        assert rank["distributed_type"] == "MULTI_CPU"
        # a whole copy on each rank, as the student: nothing to shard it with
        assert rank["teacher"]["local_elements"] == rank["source_elements"] == rank["student"]["local_elements"]
    _assert_teacher_is_the_source(seen, source_logits, one_process, tolerance=1e-5)
