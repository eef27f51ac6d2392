"""Trainer callbacks: the ramped LNS surgery, and the metrics that every run writes."""

from __future__ import annotations

import json
import math
from pathlib import Path

from transformers import TrainerCallback

from lns_surgery.core.lns_status import lns_status


def unwrap(model):
    """The model that holds ``config.lns``, through DDP/FSDP-style wrappers (PEFT is handled by set_lns_alpha)."""
    while not hasattr(model, "config") and hasattr(model, "module"):
        model = model.module
    return model


def ramp_alpha(step: int, ramp_steps: int) -> float:
    """LNS strength after ``step`` optimizer steps of a ramp over ``ramp_steps``: 0 at the start, 1 at the end."""
    if ramp_steps <= 0:
        return 1.0
    return min(1.0, step / ramp_steps)


class LNSRampCallback(TrainerCallback):
    """Moves every LNS scale from 1 to 1/sqrt(l) linearly over the first ``ramp_steps`` optimizer steps.

    Optimizer step k (1-based) runs with alpha = (k-1)/N, so training starts from the model's original
    function, and alpha reaches 1 after step N. The alpha is set after each step, before checkpoints are
    saved, so a checkpoint's config records the alpha its weights are trained to compute next; resuming
    recomputes it from the restored step count.
    """

    def __init__(self, ramp_steps: int):
        self.ramp_steps = int(ramp_steps)

    def _apply(self, model, step: int) -> None:
        from lns_surgery.conversion import set_lns_alpha

        set_lns_alpha(unwrap(model), ramp_alpha(step, self.ramp_steps))

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._apply(model, state.global_step)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self._apply(model, state.global_step)


def current_alpha(model) -> float | None:
    """The LNS strength the model trains with, or None without LNS (a folded model has nothing to ramp)."""
    model = unwrap(model)
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    status = lns_status(getattr(model, "config", None))
    return status.alpha if status.kind == "lns" else None


def final_metrics(state, train_output=None, eval_metrics: dict | None = None) -> dict:
    """metrics.json: every logged entry in order (the Trainer's ``log_history``), the train summary and
    the final evaluation with its perplexity, tokens seen and throughput."""
    summary = dict(train_output.metrics) if train_output is not None else {}
    tokens = state.num_input_tokens_seen or 0
    runtime = summary.get("train_runtime")
    summary["tokens_seen"] = int(tokens)
    if runtime:
        # over this process's run only when resumed; tokens_seen counts the whole run
        summary.setdefault("train_tokens_per_second", tokens / runtime)
    summary["global_step"] = state.global_step
    evaluation = dict(eval_metrics or {})
    if "eval_loss" in evaluation:
        try:
            evaluation["eval_perplexity"] = math.exp(evaluation["eval_loss"])
        except OverflowError:
            evaluation["eval_perplexity"] = float("inf")
    return {"train": summary, "eval": evaluation or None, "log_history": list(state.log_history)}


def write_metrics(path: str | Path, metrics: dict) -> None:
    Path(path).write_text(json.dumps(metrics, indent=2, default=str) + "\n", encoding="utf-8")


# What a log line shows, in this order; the Trainer's other keys (entropy, epoch, token counts, ...) stay in
# metrics.json's log_history.
_SHOWN = ("loss", "eval_loss", "distill_loss", "lm_loss", "lns_alpha", "learning_rate", "grad_norm")


def compact_log_line(logs: dict, step: int, max_steps: int) -> str | None:
    """One short line for a Trainer log entry, or None for an entry with nothing to show."""
    if "train_loss" in logs:  # the end-of-training summary
        return f"trained {step} steps in {logs.get('train_runtime', 0.0):.1f} s, mean loss {logs['train_loss']:.4g}"
    shown = [f"{key.removeprefix('eval_') if key == 'eval_loss' else key} {logs[key]:.4g}"
             for key in _SHOWN if isinstance(logs.get(key), (int, float))]
    if "eval_loss" in logs:
        shown[0] = "eval " + shown[0]
    return f"step {step}/{max_steps}: " + ", ".join(shown) if shown else None


def _compact_callbacks():
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    class CompactProgressCallback(ProgressCallback):
        """The Trainer's progress bar, with each log entry as one short line above it instead of a dict."""

        def on_log(self, args, state, control, logs=None, **kwargs):
            if state.is_world_process_zero and self.training_bar is not None:
                line = compact_log_line(logs or {}, state.global_step, state.max_steps)
                if line:
                    self.training_bar.write(line)

    class CompactPrinterCallback(PrinterCallback):
        """Without progress bars (``disable_tqdm``): each log entry as one short line."""

        def on_log(self, args, state, control, logs=None, **kwargs):
            if state.is_world_process_zero:
                line = compact_log_line(logs or {}, state.global_step, state.max_steps)
                if line:
                    print(line, flush=True)

    return {ProgressCallback: CompactProgressCallback, PrinterCallback: CompactPrinterCallback}


def use_compact_logs(trainer) -> None:
    """Replace the Trainer's console callbacks (raw log dicts) by ones that print a short line per entry."""
    for stock, compact in _compact_callbacks().items():
        if any(type(callback) is stock for callback in trainer.callback_handler.callbacks):
            trainer.remove_callback(stock)
            trainer.add_callback(compact)
