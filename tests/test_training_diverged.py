"""A run whose weights blow up exports nothing: the real stories260K trained with an absurd (but
finite, so accepted) learning rate, through the command line a user types."""

from __future__ import annotations

import json
import re

import pytest
from conftest import invoke_cli, shared_path


@pytest.mark.floor
def test_diverged_run_is_refused_before_export(stories_path, tmp_path):
    out = tmp_path / "out"
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"model_name_or_path: {stories_path}\nlns_convert: true\n"
        f"dataset_name: {shared_path('data/alpaca/alpaca_first100.json')}\nmax_length: 128\n"
        "use_peft: true\nlora_r: 4\nlora_alpha: 8\nlora_dropout: 0.0\nexport: both\n"
        f"output_dir: {out}\nmax_steps: 3\nper_device_train_batch_size: 4\nlearning_rate: 1.0e+30\n"
        "logging_steps: 1\nactivation_checkpointing: false\nuse_cpu: true\nreport_to: none\n"
        "disable_tqdm: true\nseed: 0\n", encoding="utf-8")

    result = invoke_cli("sft", "--recipe", str(recipe))

    assert result.returncode == 2, result.stdout + result.stderr
    line = result.stderr.strip().splitlines()[-1]
    match = re.fullmatch(r"error: training diverged: (\d+) of (\d+) weight tensors hold inf or NaN \(e\.g\. (\S+)\); "
                         r"nothing was exported, and '(.+)' is kept for inspection \(try a lower learning_rate\)", line)
    assert match, line
    bad, total = int(match[1]), int(match[2])
    assert 0 < bad <= total and "lora_" in match[3]  # LoRA trains only the adapters: they blew up
    assert not out.exists()  # no model, no adapter, no half-written output folder
    work = tmp_path / "out.incomplete"
    assert match[4] == str(work)
    # the working folder stays, with the losses that show where the run went
    losses = [entry["loss"] for entry in json.loads((work / "metrics.json").read_text())["log_history"] if "loss" in entry]
    assert len(losses) == 3
    assert not list(work.glob("*.safetensors")) and not (work / "adapter").exists()
