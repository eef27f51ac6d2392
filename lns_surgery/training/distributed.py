"""The distributed mode a run asked for and the one it got: FSDP and DeepSpeed must never quietly become DDP.

accelerate decides the mode inside the Trainer, and where it cannot shard it falls back without a word:
an FSDP or DeepSpeed config on CPU (``use_cpu``, or a machine without a GPU) trains as plain data
parallel. A user who asked for sharding would then believe that sharded training was tested, or run out
of memory on the next, larger machine, so the run stops before training and says why. A recipe's
``fsdp`` key in a process that no launcher started is refused the same way, before the model is loaded.
"""

from __future__ import annotations

import contextlib
import os

from lns_surgery.core.errors import LNSError


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "false").strip().lower() in ("1", "true", "yes")


def requested_sharding(training) -> tuple[str, str] | None:
    """``(mode, who asked)`` for a run that asked for FSDP or DeepSpeed, else None.

    ``accelerate launch`` passes its config's choice in ``ACCELERATE_USE_FSDP`` / ``ACCELERATE_USE_DEEPSPEED``;
    a recipe can ask through the Trainer's own ``fsdp`` and ``deepspeed`` keys.
    """
    if _env_flag("ACCELERATE_USE_DEEPSPEED"):
        return "DeepSpeed", "the accelerate config"
    if getattr(training, "deepspeed", None):
        return "DeepSpeed", "the recipe's deepspeed key"
    if _env_flag("ACCELERATE_USE_FSDP"):
        return "FSDP", "the accelerate config"
    if getattr(training, "fsdp", None):
        return "FSDP", "the recipe's fsdp key"
    return None


def _why(distributed_type: str, device_type: str, mode: str) -> str:
    if device_type == "cpu":
        return (f"accelerate sets up {mode} only on GPUs and other accelerators, never on CPU (use_cpu, or a "
                "machine without one); for data parallel on CPU launch with recipes/accelerate/ddp.yaml's settings")
    if distributed_type == "NO":
        return f"{mode} needs a process group even on one GPU: start the run with accelerate launch (or torchrun)"
    return "check the accelerate config and the installed accelerate"


def _refusal(source: str, mode: str, distributed_type: str, device_type: str) -> LNSError:
    shape = {"MULTI_CPU": "DDP on CPU (MULTI_CPU)", "NO": "a single unsharded process"}.get(distributed_type,
                                                                                       distributed_type)
    why = _why(distributed_type, device_type, mode)
    return LNSError(f"{source} asks for {mode}, but this run would train as {shape}: {why}")


def check_launch(training) -> None:
    """Before anything is loaded: FSDP asked for in a process that no launcher started (transformers
    refuses that too, but only once the model is loaded, and not in one line)."""
    request = requested_sharding(training)
    if request is None or request[0] != "FSDP" or training.parallel_mode.value == "distributed":
        return
    raise _refusal(request[1], "FSDP", "NO", training.device.type)


def check_sharding(trainer) -> None:
    """Raise ``LNSError`` when the run asked for FSDP or DeepSpeed and the Trainer set up something else."""
    request = requested_sharding(trainer.args)
    if request is None:
        return
    mode, source = request
    if trainer.is_fsdp_enabled if mode == "FSDP" else trainer.is_deepspeed_enabled:
        return
    accelerator = trainer.accelerator
    distributed_type = getattr(accelerator.distributed_type, "value", str(accelerator.distributed_type))
    raise _refusal(source, mode, distributed_type, accelerator.device.type)


@contextlib.contextmanager
def outside_zero3_init():
    """Build models as whole, unpartitioned modules even while a ZeRO-3 run is active.

    While a ZeRO-3 config is registered, transformers builds every model inside ``deepspeed.zero.Init``,
    which partitions each weight across the ranks as it is created: a collective that every rank must
    join. Work done on one process (the merged-LoRA rebuild on the main process) would wait for the
    other ranks forever, and a meta-device twin built for tracing fails to initialise.
    """
    from transformers.integrations import deepspeed as hf_deepspeed

    if not hf_deepspeed.is_deepspeed_zero3_enabled():
        yield
        return
    active = hf_deepspeed._hf_deepspeed_config_weak_ref()  # the config whose registration turns zero.Init on
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hf_deepspeed.set_hf_deepspeed_config(active)
