"""Two-process data-parallel training on CPU (gloo), launched the way users launch it on GPUs."""

from __future__ import annotations

import json
import shutil
import subprocess
import textwrap

import pytest

from conftest import shared_path

# Each rank records a fingerprint of its final weights; the ranks see different batches, so they only
# agree if DDP averaged their gradients.
_RANK_SCRIPT = """
import json, os, sys
from transformers import TrainerCallback
from lns_surgery.training.run import train_from_dict

class Fingerprint(TrainerCallback):
    def on_train_end(self, args, state, control, model=None, **kwargs):
        sums = {name: float(p.detach().double().sum()) for name, p in model.named_parameters()}
        with open(os.path.join(sys.argv[2], f"rank{os.environ['RANK']}.json"), "w") as handle:
            json.dump({"world": int(os.environ["WORLD_SIZE"]), "step": state.global_step, "sums": sums,
                       "alpha": model.config.lns["alpha"]}, handle)

train_from_dict(json.loads(sys.argv[1]), "pretrain", callbacks=[Fingerprint()])
"""


@pytest.mark.slow
def test_two_process_ddp_ranks_agree_on_saved_weights(stories_path, tmp_path):
    if shutil.which("accelerate") is None:
        pytest.skip("the accelerate launcher is not on PATH")
    script = tmp_path / "rank.py"
    script.write_text(textwrap.dedent(_RANK_SCRIPT))
    out = tmp_path / "out"
    settings = {"model_name_or_path": str(stories_path), "lns_convert": True, "lns_ramp_steps": 2,
                "dataset_name": str(shared_path("data/c4-sample/c4_sample300.jsonl")), "output_dir": str(out),
                "max_steps": 3, "max_length": 64, "per_device_train_batch_size": 2, "learning_rate": 3e-3,
                "activation_checkpointing": False, "use_cpu": True, "report_to": "none", "disable_tqdm": True}
    # --multi_gpu selects the torchrun launcher; use_cpu in the recipe makes each rank use gloo on CPU
    launched = subprocess.run(
        ["accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
         "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
         str(script), json.dumps(settings), str(tmp_path)],
        capture_output=True, text=True, timeout=900, stdin=subprocess.DEVNULL)
    assert launched.returncode == 0, launched.stdout[-2000:] + launched.stderr[-4000:]

    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert [r["world"] for r in ranks] == [2, 2] and [r["step"] for r in ranks] == [3, 3]
    assert ranks[0]["alpha"] == ranks[1]["alpha"] == 1.0
    assert ranks[0]["sums"] == ranks[1]["sums"]

    # the one saved model is those weights, and it trained on both ranks' data
    from safetensors.torch import load_file

    saved = load_file(out / "model.safetensors")
    for name, tensor in saved.items():
        assert float(tensor.double().sum()) == pytest.approx(ranks[0]["sums"][name], rel=1e-6, abs=1e-6), name
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["train"]["tokens_seen"] == 2 * 3 * 2 * 64  # ranks x steps x batch x packed length
    assert json.loads((out / "config.json").read_text())["lns"]["alpha"] == 1.0
