"""The one decision accelerate makes on a GPU, made on CPU too, so FSDP2 and ZeRO-3 really shard there.

accelerate (1.16) sets up FSDP and DeepSpeed only on GPU-like devices: on CPU a run with an FSDP plugin
stays MULTI_CPU (DDP; lns-surgery refuses that), and DeepSpeed is skipped under use_cpu and finds no
backend without it. ``shard_on_this_device(launcher)`` patches exactly that decision, for CPU and gloo,
and changes nothing on a GPU (where neither condition holds); everything after it (fully_shard per block,
ZeRO-3 partitioning, the collectives, gathering the full state dict, the Trainer's save paths) is
accelerate's, DeepSpeed's and transformers' own code. Used by the rank scripts that sharded runs launch:
scripts/sharded_rank.py and tests/distill_rank.py.
"""

import os

LAUNCHERS = ("fsdp", "zero3")


def shard_on_this_device(launcher: str) -> None:
    """Patch accelerate for ``launcher`` (``fsdp`` or ``zero3``); call it before anything builds its state."""
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    if launcher == "fsdp":
        accelerator_state_init = AcceleratorState.__init__

        def init_with_cpu_fsdp(self, *args, fsdp_plugin=None, **kwargs):
            accelerator_state_init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
            if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
                self.distributed_type = DistributedType.FSDP
                self.fsdp_plugin = fsdp_plugin
                PartialState._shared_state["distributed_type"] = DistributedType.FSDP

        AcceleratorState.__init__ = init_with_cpu_fsdp
    elif launcher == "zero3":
        prepare_backend = PartialState._prepare_backend

        def prepare_cpu_backend(self, cpu=False, sagemaker_dp=False, backend=None):
            backend, distributed_type = prepare_backend(self, cpu, sagemaker_dp, backend)
            if distributed_type == DistributedType.NO and int(os.environ.get("LOCAL_RANK", -1)) != -1:
                return "gloo", DistributedType.MULTI_CPU  # DeepSpeed's CPU accelerator talks gloo too
            return backend, distributed_type

        PartialState._prepare_backend = prepare_cpu_backend
    else:
        raise ValueError(f"unknown launcher {launcher!r} ({', '.join(LAUNCHERS)})")
