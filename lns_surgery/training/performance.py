"""How fast a run trains and how much memory it takes: the attention path for packed batches, and the
steady-state throughput, MFU and peak memory that every run records in ``metrics.json``."""

from __future__ import annotations

import logging
import resource
import sys
import time

from transformers import TrainerCallback

logger = logging.getLogger(__name__)

# Dense bf16/fp16 tensor-core peak (TFLOP/s, no sparsity) of the GPUs training is likely to meet, by a
# fragment of the name torch reports. A GPU not listed gets no MFU rather than a guessed one.
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0, "L4": 121.0}

# Steps left out of the steady state: the first runs the allocator's warm-up and any compilation.
WARMUP_STEPS = 1


def gpu_peak_tflops(device_name: str | None) -> float | None:
    """The dense bf16 peak of the named GPU, or None for a GPU (or CPU) the table does not know."""
    if not device_name:
        return None
    return next((peak for fragment, peak in PEAK_BF16_TFLOPS.items() if fragment in device_name), None)


def packing_attention(training, model_config, cuda_available: bool, flash_attn_installed: bool) -> str | None:
    """The attention implementation for a run that packs documents padding-free, or None to keep the model's.

    Packed rows carry ``position_ids`` that restart at each document. With sdpa, transformers turns them into
    a dense (T x T) block-causal mask over the whole flattened micro-batch (T = batch x max_length tokens),
    which costs memory and time quadratic in T. flash-attention's variable-length kernel and flex
    attention's block mask keep documents apart without it. Flex attention has no backward on CPU, so CPU
    runs keep sdpa. A recipe that names ``attn_implementation`` keeps its choice.
    """
    packs = bool(training.padding_free or (training.packing and training.packing_strategy in ("bfd", "bfd_split")))
    if not packs or model_config.attn_implementation or not cuda_available:
        return None
    return "flash_attention_2" if flash_attn_installed else "flex_attention"


def _peak_host_memory_gb() -> float:
    """This process's peak resident memory (ru_maxrss is in KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (2**30 if sys.platform == "darwin" else 2**20)


class ThroughputCallback(TrainerCallback):
    """Times each optimizer step from its first micro-batch to the end of the optimizer update, so that
    evaluation, checkpoint saves and logging between steps are left out, and records in ``summary()``:

    - ``steady_tokens_per_second``: tokens (all ranks; non-padding, as the run counts them) per second of
      step time, over the steps after the first ``WARMUP_STEPS``;
    - ``mfu``: model FLOPs per second / the GPU's dense bf16 peak x the number of processes, where the run
      is bf16/fp16 on a GPU the table knows. Model FLOPs per token are 6N for full fine-tuning and 4N with
      LoRA (frozen weights need no weight gradients), N the non-embedding parameters; attention-score
      FLOPs are not counted, so the figure is a slight underestimate;
    - ``peak_gpu_memory_gb`` (CUDA's max allocated on this rank) and ``peak_host_memory_gb`` (peak RSS).
    """

    def __init__(self, lora: bool = False):
        self.lora = lora
        self._torch = None
        self._started = None
        self._tokens_at_start = 0
        self.step_seconds: list[float] = []
        self.step_tokens: list[int] = []
        self.flops_per_token = None
        self.peak_tflops = None
        self.processes = 1

    def _synchronize(self):
        if self._torch.cuda.is_available():
            self._torch.cuda.synchronize()

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        import torch

        self._torch = torch
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
            if args.bf16 or args.fp16:
                self.peak_tflops = gpu_peak_tflops(torch.cuda.get_device_name())
        self.processes = max(1, args.world_size)
        if model is not None and hasattr(model, "num_parameters"):
            parameters = model.num_parameters(exclude_embeddings=True)
            if self.lora:  # the adapter's own weights are a rounding error next to the frozen ones
                parameters -= model.num_parameters(only_trainable=True)
            self.flops_per_token = (4 if self.lora else 6) * parameters

    def on_step_begin(self, args, state, control, **kwargs):
        self._synchronize()
        self._started = time.perf_counter()
        self._tokens_at_start = state.num_input_tokens_seen or 0

    def on_step_end(self, args, state, control, **kwargs):
        if self._started is None:
            return
        self._synchronize()
        self.step_seconds.append(time.perf_counter() - self._started)
        self.step_tokens.append((state.num_input_tokens_seen or 0) - self._tokens_at_start)
        self._started = None

    def summary(self) -> dict:
        torch = self._torch
        steady = slice(WARMUP_STEPS, None) if len(self.step_seconds) > WARMUP_STEPS else slice(None)
        seconds, tokens = sum(self.step_seconds[steady]), sum(self.step_tokens[steady])
        result = {
            "steady_steps": len(self.step_seconds[steady]),
            "steady_tokens_per_second": tokens / seconds if seconds > 0 and tokens > 0 else None,
            "mfu": None,
            "peak_gpu_memory_gb": None,
            "peak_host_memory_gb": round(_peak_host_memory_gb(), 3),
        }
        if result["steady_tokens_per_second"] and self.flops_per_token and self.peak_tflops:
            achieved = result["steady_tokens_per_second"] * self.flops_per_token
            result["mfu"] = achieved / (self.peak_tflops * 1e12 * self.processes)
        if torch is not None and torch.cuda.is_available():
            result["peak_gpu_memory_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
        return result
