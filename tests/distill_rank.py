"""One rank of a distillation check under a launcher, on CPU: for each mode, builds a run with
``distill: true``, records what its teacher computes and holds, trains, and writes ``rank<RANK>-<mode>.json``
to OUT.

    accelerate launch --config_file recipes/accelerate/fsdp.yaml tests/distill_rank.py fsdp SETTINGS OUT MODES

LAUNCHER is ``fsdp``, ``zero3`` or ``ddp``; SETTINGS a JSON object of recipe keys; MODES a JSON object of
mode name -> the recipe keys it adds (e.g. ``{"full": {}, "lora": {"use_peft": true}}``). Used by
tests/test_training_distill_sharded.py.
"""

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
from cpu_sharding import LAUNCHERS, shard_on_this_device  # noqa: E402

launcher, settings, out, modes = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3], json.loads(sys.argv[4])
IDS = [1, 403, 407, 261, 378, 275, 261, 157, 29, 13]

if launcher in LAUNCHERS:
    shard_on_this_device(launcher)  # on CPU, the one decision accelerate makes on a GPU (see cpu_sharding.py)
elif launcher != "ddp":
    raise SystemExit(f"distill_rank.py: unknown launcher {launcher!r} (fsdp, zero3 or ddp)")

import torch  # noqa: E402
from accelerate.state import AcceleratorState  # noqa: E402
from torch.distributed.tensor import DTensor  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

from lns_surgery.training.recipe import recipe_from_dict  # noqa: E402
from lns_surgery.training.run import build_trainer  # noqa: E402


def placement(parameters):
    parameters = list(parameters)
    return {"params": len(parameters), "dtensor": sum(isinstance(p, DTensor) for p in parameters),
            "partitioned": sum(hasattr(p, "ds_id") and p.numel() == 0 for p in parameters),
            "local_elements": sum((p.to_local() if isinstance(p, DTensor) else getattr(p, "ds_tensor", p)).numel()
                                  for p in parameters)}


class Record(TrainerCallback):
    def __init__(self):
        self.student = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.student = placement(model.parameters())


def run(mode, extra):
    record = Record()
    recipe = recipe_from_dict({**settings, **extra, "output_dir": os.path.join(out, mode)}, "pretrain")
    trainer, info = build_trainer(recipe, callbacks=[record])
    teacher = trainer.teacher
    seen = {"distributed_type": AcceleratorState().distributed_type.value, "lora": info["lora"],
            "teacher": placement(teacher.parameters()),
            "teacher_dtypes": sorted({str(p.dtype) for p in teacher.parameters()}),
            "source_elements": None if teacher.core is None else sum(p.numel() for p in teacher.core.parameters())}
    ids = torch.tensor([IDS])
    # A LoRA teacher is the student, which the launcher shards only once training starts.
    seen["teacher_logits"] = None if info["lora"] else teacher.logits(trainer.model, {"input_ids": ids})[0].tolist()
    trainer.train()
    seen["teacher_logits_after"] = teacher.logits(trainer.model_wrapped, {"input_ids": ids})[0].tolist()
    seen["student"] = record.student
    for key in ("distill_loss", "lm_loss"):
        seen[key] = [entry[key] for entry in trainer.state.log_history if key in entry]
    with open(os.path.join(out, f"rank{os.environ.get('RANK', '0')}-{mode}.json"), "w") as handle:
        json.dump(seen, handle)


for mode, extra in modes.items():
    run(mode, extra)
