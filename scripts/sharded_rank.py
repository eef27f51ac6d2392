"""One rank of a sharded training check: full fine-tuning, then LoRA, of a model converted to LNS on load,
each rank writing what it saw to ``rank<RANK>-<mode>.json`` in OUT.

    accelerate launch --config_file recipes/accelerate/fsdp.yaml scripts/sharded_rank.py fsdp SETTINGS OUT LORA
    python3 scripts/sharded_rank.py none SETTINGS OUT LORA      # the same steps in one unlaunched process

SETTINGS and LORA are JSON objects of recipe keys (LORA: the keys added for the LoRA run). LAUNCHER is
``fsdp``, ``zero3`` or ``none``. Used by tests/test_training_sharded.py (two gloo processes on CPU) and by
scripts/gpu_check.sh (one GPU).
"""

import json
import os
import re
import sys

from cpu_sharding import LAUNCHERS, shard_on_this_device  # beside this script

launcher, settings, out, lora = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3], json.loads(sys.argv[4])

if launcher in LAUNCHERS:
    shard_on_this_device(launcher)  # on CPU, the one decision accelerate makes on a GPU (see cpu_sharding.py)
elif launcher != "none":
    raise SystemExit(f"sharded_rank.py: unknown launcher {launcher!r} (fsdp, zero3 or none)")

from torch.distributed.fsdp import FSDPModule  # noqa: E402
from accelerate.state import AcceleratorState  # noqa: E402
from torch.distributed.tensor import DTensor  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

from lns_surgery.training import models  # noqa: E402
from lns_surgery.training.run import _is_sharded_or_quantized, train_from_dict  # noqa: E402

load_calls = []
_load_model = models.load_model


def counting_load_model(*args, **kwargs):
    load_calls.append(1)
    return _load_model(*args, **kwargs)


models.load_model = counting_load_model  # the merged-LoRA rebuild loads the base a second time


def lns_model(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def scales(model):
    model = lns_model(model)
    found = {}
    for name, module in model.named_modules():
        if hasattr(module, "lns_scale"):
            layer = int(re.search(r"layers\.(\d+)\.", name).group(1))
            found[name] = [layer, module.lns_scale, hasattr(type(module), "lns_kind")]
    return {"alpha": model.config.lns["alpha"], "norms": found}


class Record(TrainerCallback):
    def __init__(self):
        self.seen = {}

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        params = list(model.parameters())
        blocks = lns_model(model).model.layers
        self.seen.update(
            params=len(params), dtensor_params=sum(isinstance(p, DTensor) for p in params),
            partitioned_params=sum(hasattr(p, "ds_id") and p.numel() == 0 for p in params),
            sharded_blocks=sum(isinstance(block, FSDPModule) for block in blocks), layers=len(blocks),
            block_classes=sorted({type(block).__name__ for block in blocks}),
            distributed_type=AcceleratorState().distributed_type.value, steps=[scales(model)])

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.seen["steps"].append(scales(model))


for mode, extra in (("full", {}), ("lora", lora)):
    load_calls.clear()
    record = Record()
    result = train_from_dict({**settings, **extra, "output_dir": os.path.join(out, mode)}, "pretrain",
                             callbacks=[record])
    final = list(result.model.parameters()) if result.model is not None else None
    record.seen.update(
        is_fsdp_enabled=result.trainer.is_fsdp_enabled, is_deepspeed_enabled=result.trainer.is_deepspeed_enabled,
        rebuilds=_is_sharded_or_quantized(result.trainer), load_calls=len(load_calls),
        final_class=type(result.model).__name__ if final is not None else None,
        final_whole=None if final is None else all(
            not isinstance(p, DTensor) and not hasattr(p, "ds_id") and p.numel() > 0 for p in final))
    with open(os.path.join(out, f"rank{os.environ.get('RANK', '0')}-{mode}.json"), "w") as handle:
        json.dump(record.seen, handle)
