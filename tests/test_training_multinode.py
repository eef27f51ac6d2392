"""Training over two machines, played by two accelerate launchers on 127.0.0.1 with one CPU process each,
started the way recipes/accelerate/multinode-ddp.yaml and slurm.sbatch start them on real machines."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap

import pytest

from conftest import REPO_ROOT, shared_path

CONFIG = REPO_ROOT / "recipes" / "accelerate" / "multinode-ddp.yaml"
SBATCH = REPO_ROOT / "recipes" / "accelerate" / "slurm.sbatch"

# Each rank saves its final weights and what the launcher told it; the ranks see different batches, so
# their weights only agree if the gradients were averaged across the two machines.
_RANK_SCRIPT = """
import json, os, sys
from safetensors.torch import save_file
from transformers import TrainerCallback
from lns_surgery.training.run import train_from_dict

settings, records = json.loads(sys.argv[1]), sys.argv[2]

class Weights(TrainerCallback):
    def on_train_end(self, args, state, control, model=None, **kwargs):
        rank = os.environ["RANK"]
        save_file({n: p.detach().clone().contiguous() for n, p in model.named_parameters()},
                  os.path.join(records, f"rank{rank}.safetensors"))
        with open(os.path.join(records, f"rank{rank}.json"), "w") as handle:
            json.dump({key: os.environ.get(key) for key in ("RANK", "LOCAL_RANK", "GROUP_RANK", "WORLD_SIZE",
                                                            "LOCAL_WORLD_SIZE", "MASTER_ADDR")}
                      | {"step": state.global_step, "world_process_zero": state.is_world_process_zero}, handle)

train_from_dict(settings, "pretrain", callbacks=[Weights()])
"""


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.slow
def test_two_machines_train_one_model_and_write_it_once(stories_path, tmp_path):
    from safetensors.torch import load_file

    script = tmp_path / "rank.py"
    script.write_text(textwrap.dedent(_RANK_SCRIPT))
    records = tmp_path / "records"
    records.mkdir()
    # A relative output_dir in a folder of each machine's own: what one machine writes, the other cannot see
    machines = [tmp_path / "machine0", tmp_path / "machine1"]
    for folder in machines:
        folder.mkdir()
    settings = {"model_name_or_path": str(stories_path), "lns_convert": True,
                "dataset_name": str(shared_path("data/c4-sample/c4_sample300.jsonl")), "output_dir": "out",
                "max_steps": 2, "max_length": 64, "per_device_train_batch_size": 2, "learning_rate": 3e-3,
                "activation_checkpointing": False, "use_cpu": True, "report_to": "none", "disable_tqdm": True,
                "save_strategy": "no", "seed": 0}
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    # the shipped config, with what slurm.sbatch overrides per machine; use_cpu in the recipe makes each
    # rank use gloo on the CPU
    launchers = [
        subprocess.Popen(
            [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIG),
             "--num_machines", "2", "--machine_rank", str(rank), "--num_processes", "2",
             "--main_process_ip", "127.0.0.1", "--main_process_port", str(port),
             "--mixed_precision", "no", "--dynamo_backend", "no",
             str(script), json.dumps(settings), str(records)],
            cwd=machines[rank], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            stdin=subprocess.DEVNULL)
        for rank in (0, 1)]
    outputs = []
    try:
        for launcher in launchers:
            outputs.append(launcher.communicate(timeout=600)[0])
    finally:
        for launcher in launchers:
            if launcher.poll() is None:
                launcher.kill()
    for launcher, output in zip(launchers, outputs):
        assert launcher.returncode == 0, output[-4000:]

    seen = [json.loads((records / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    # two machines (node ranks 0 and 1) of one process each (local rank 0), one world of two
    assert [(s["RANK"], s["GROUP_RANK"], s["LOCAL_RANK"]) for s in seen] == [("0", "0", "0"), ("1", "1", "0")]
    assert {s["WORLD_SIZE"] for s in seen} == {"2"} and {s["LOCAL_WORLD_SIZE"] for s in seen} == {"1"}
    assert [s["step"] for s in seen] == [2, 2]
    assert [s["world_process_zero"] for s in seen] == [True, False]

    # both machines ended with the same weights, bit for bit
    weights = [load_file(records / f"rank{rank}.safetensors") for rank in (0, 1)]
    assert weights[0].keys() == weights[1].keys()
    for name, tensor in weights[0].items():
        assert (tensor == weights[1][name]).all(), name

    # the model was written once, by machine 0, and is those weights; machine 1 wrote nothing
    saved = load_file(machines[0] / "out" / "model.safetensors")
    for name, tensor in saved.items():
        assert (tensor == weights[0][name]).all(), name
    assert json.loads((machines[0] / "out" / "config.json").read_text())["lns"]["alpha"] == 1.0
    assert list(machines[1].iterdir()) == []
    assert not (machines[0] / "out.incomplete").exists()


def test_slurm_script_gives_each_machine_its_rank(tmp_path):
    """slurm.sbatch under stand-ins for srun (runs the task once per node with SLURM_NODEID set), scontrol
    and accelerate (prints its arguments): each node's launcher gets its own machine rank, the whole
    world's process count and the first node as the rendezvous host."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(textwrap.dedent("""\
        #!/bin/bash
        while [[ "$1" == --* ]]; do shift; done
        for node in $(seq 0 $((SLURM_NNODES - 1))); do SLURM_NODEID=$node "$@"; done
    """))
    (bin_dir / "scontrol").write_text("#!/bin/bash\necho gpu-node-07\necho gpu-node-08\n")
    (bin_dir / "accelerate").write_text('#!/bin/bash\necho "accelerate $*"\n')
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_NNODES": "2",
           "SLURM_JOB_NODELIST": "gpu-node-[07-08]", "COMMAND": "sft --recipe recipes/alpaca.yaml"}
    done = subprocess.run(["bash", str(SBATCH)], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=60, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr
    launches = done.stdout.split()
    lines = [line.split() for line in done.stdout.splitlines()]
    assert len(lines) == 2, done.stdout
    for rank, args in enumerate(lines):
        options = dict(zip(args[2::2], args[3::2]))
        assert options["--config_file"] == "recipes/accelerate/multinode-ddp.yaml"
        assert options["--num_machines"] == "2" and options["--machine_rank"] == str(rank)
        assert options["--num_processes"] == "16"
        assert options["--main_process_ip"] == "gpu-node-07" and options["--main_process_port"] == "29500"
        assert args[-5:] == ["-m", "lns_surgery", "sft", "--recipe", "recipes/alpaca.yaml"]
    assert launches.count("accelerate") == 2
