"""Healing by distillation: the converted model learns to give the source model's next-token distribution.

The teacher is the *source* model, the checkpoint before the surgery, and it costs no second copy
where it can be avoided:

- with LoRA, the teacher is the student's own weights with the adapter disabled (PEFT's
  ``disable_adapter``, which also bypasses ``modules_to_save`` copies) and the LNS strength set to 0,
  which is exactly the original function;
- with full fine-tuning the weights move, so the teacher is a frozen copy taken before the first step,
  with LNS strength 0 (a stock model is copied as it is).

The loss is TRL's generalized Jensen-Shannon divergence (``GKDTrainer.generalized_jsd_loss``) with
``beta=0``, which is the forward KL divergence KL(teacher || student) per predicted token, over the
tokens that carry the language-modelling loss. TRL's own ``DistillationTrainer`` and ``GKDTrainer``
are built for a separately loaded teacher and on-policy generation from prompts; healing needs neither,
so only their loss is used. ``distill_weight`` mixes it with the language-modelling loss:
``loss = distill_weight * KL + (1 - distill_weight) * LM``.
"""

from __future__ import annotations

import contextlib
import copy
import os

import torch

from lns_surgery.core.lns_status import lns_status
from lns_surgery.training.callbacks import unwrap


def _is_peft(model) -> bool:
    return hasattr(model, "disable_adapter") and hasattr(model, "get_base_model")


def _lns_model(model):
    model = unwrap(model)
    return model.get_base_model() if _is_peft(model) else model


@contextlib.contextmanager
def _lns_strength(model, alpha: float):
    """Run with every LNS scale at ``alpha`` (nothing to do for a stock model), then restore it."""
    from lns_surgery.training.callbacks import current_alpha

    target = _lns_model(model)
    before = current_alpha(target)
    if before is None:
        yield
        return
    target.set_lns_alpha(alpha)
    try:
        yield
    finally:
        target.set_lns_alpha(before)


@contextlib.contextmanager
def _eval_mode(model):
    """The teacher runs without dropout, whatever mode the student is in."""
    training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(training)


class SourceTeacher:
    """Logits of the source model for a batch: a frozen copy, or the LoRA student with its adapter off."""

    def __init__(self, frozen=None):
        self.frozen = frozen

    @classmethod
    def frozen_copy(cls, model) -> "SourceTeacher":
        """For full fine-tuning; take it before the trainer wraps or patches the model (TRL replaces the
        instance's ``forward`` with a closure over the original, which a deep copy would keep calling)."""
        frozen = copy.deepcopy(model)
        frozen.requires_grad_(False)
        frozen.eval()
        if lns_status(getattr(frozen, "config", None)).kind == "lns":
            frozen.set_lns_alpha(0.0)
        return cls(frozen)

    @torch.no_grad()
    def logits(self, model, inputs: dict) -> torch.Tensor:
        if self.frozen is not None:
            self.frozen.to(inputs["input_ids"].device)  # a no-op after the first batch
            return self.frozen(**inputs).logits
        peft_model = unwrap(model)  # called directly: a DDP wrapper has nothing to synchronise here
        if not _is_peft(peft_model):
            raise TypeError("a teacher without a frozen copy needs a PEFT (LoRA) student")
        with peft_model.disable_adapter(), _lns_strength(peft_model, 0.0), _eval_mode(peft_model):
            return peft_model(**inputs).logits

    def parameters(self):
        return [] if self.frozen is None else list(self.frozen.parameters())


def distillation_loss(student_logits, teacher_logits, labels, temperature: float = 1.0, num_items_in_batch=None):
    """KL(teacher || student) per predicted token, over the positions whose next token carries the LM loss."""
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    from trl.experimental.gkd import GKDTrainer

    # Position t predicts token t+1, as in the causal-LM loss. Only the positions that carry that loss
    # enter the vocabulary-wide softmaxes (TRL's loss masks after computing every position): with
    # assistant-only SFT the prompts cost nothing. The rows come as (tokens, vocab), whose batch mean is
    # the mean over those tokens, as TRL's own masking gives.
    carries_loss = labels[:, 1:] != -100
    return GKDTrainer.generalized_jsd_loss(
        student_logits[:, :-1][carries_loss].float(),
        teacher_logits[:, :-1][carries_loss].float(),
        labels=None,
        beta=0.0,
        temperature=temperature,
        num_items_in_batch=num_items_in_batch,
    )


def distilling_compute_loss(trainer, model, inputs, return_outputs=False, num_items_in_batch=None):
    """``Trainer.compute_loss`` for distillation: one student forward with logits, one teacher forward
    without gradients, and ``distill_weight * KL + (1 - distill_weight) * LM``."""
    settings = trainer.distillation
    inputs = {**inputs, "use_cache": False}
    labels = inputs.pop("labels")
    student = model(**inputs)
    teacher_logits = trainer.teacher.logits(model, inputs)
    weight = settings["weight"]
    distill = distillation_loss(student.logits, teacher_logits, labels, settings["temperature"], num_items_in_batch)
    with torch.set_grad_enabled(torch.is_grad_enabled() and weight < 1.0):  # logged either way, trained only if mixed in
        lm = _lns_model(model).loss_function(logits=student.logits, labels=labels,
                                             vocab_size=student.logits.shape[-1], num_items_in_batch=num_items_in_batch)
    loss = weight * distill + (1.0 - weight) * lm
    if trainer.args.average_tokens_across_devices and num_items_in_batch is not None:
        # As TRL's SFTTrainer: num_items_in_batch counts every rank's tokens and DDP averages gradients.
        loss = loss * trainer.accelerator.num_processes
    mode = "train" if model.training else "eval"
    trainer._metrics[mode]["distill_loss"].append(trainer.accelerator.gather_for_metrics(distill.detach()).mean().item())
    trainer._metrics[mode]["lm_loss"].append(trainer.accelerator.gather_for_metrics(lm.detach()).mean().item())
    return (loss, student) if return_outputs else loss
