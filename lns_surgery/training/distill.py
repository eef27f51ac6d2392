"""Healing by distillation: the converted model learns to give the source model's next-token distribution.

The teacher is the *source* model, the checkpoint before the surgery:

- with LoRA it is the student's own weights with the adapter disabled (PEFT's ``disable_adapter``) and
  the LNS strength set to 0, which is exactly the original function: no second copy;
- with full fine-tuning the weights move, so the teacher is loaded as its own model from the checkpoint
  the student came from (a stock source stays stock, an LNS checkpoint runs at strength 0), in the
  training dtype, and prepared the way TRL prepares its reference and teacher models: partitioned by
  ZeRO-3, sharded by FSDP2 exactly like the student (accelerate's own preparation, which also broadcasts
  rank 0's weights under ``fsdp_cpu_ram_efficient_loading``), or placed on each data-parallel rank.

The loss is KL(teacher || student) per predicted token (TRL's generalized JSD at ``beta=0``), over the
tokens that carry the language-modelling loss, mixed with that LM loss:
``loss = weight * KL + (1 - weight) * LM``. Both come from the same pass over the vocabulary, in chunks of
``chunk_size`` tokens: the full-vocabulary logits of student and teacher never exist at once, so memory
grows with the chunk, not with tokens x vocabulary. The gradient with respect to the student's hidden
states and LM head is computed in that same pass (as fused linear cross-entropy losses do), so the
backward pass has no vocabulary-wide work left. TRL's chunked divergence kernel gives the KL alone;
the LM loss beside it (logged at every weight, and the perplexity the healing study reports) would then
need a second pass over the vocabulary, so the chunks are computed here.

The loss runs inside the student's forward (a ``forward`` that accepts ``lns_distill``, installed the way
TRL's SFTTrainer installs its fused LM head), so DDP, FSDP and DeepSpeed see an ordinary forward and keep
the LM head's parameters materialised while it reads them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import types
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from transformers.utils import ModelOutput

from lns_surgery.core.errors import LNSError
from lns_surgery.core.lns_status import lns_status
from lns_surgery.training.callbacks import unwrap

# Tokens per chunk: a chunk holds four fp32 (tokens x vocabulary) tiles at its peak, 2.5 GB at a 152K vocabulary.
DEFAULT_CHUNK_SIZE = 1024


@dataclass(frozen=True)
class DistillationSettings:
    """How the distillation loss is computed: ``weight * KL + (1 - weight) * LM`` at ``temperature``, over
    ``chunk_size`` tokens at a time."""

    temperature: float = 1.0
    weight: float = 1.0
    chunk_size: int = DEFAULT_CHUNK_SIZE

    def __post_init__(self):
        if not self.temperature > 0:
            raise LNSError(f"distill_temperature must be > 0, got {self.temperature}")
        if not 0.0 <= self.weight <= 1.0:
            raise LNSError(f"distill_weight must be in [0, 1], got {self.weight}")
        if int(self.chunk_size) != self.chunk_size or self.chunk_size < 1:
            raise LNSError(f"the distillation chunk size must be a positive integer, got {self.chunk_size}")

    @classmethod
    def from_recipe(cls, args) -> DistillationSettings:
        return cls(temperature=float(args.distill_temperature), weight=float(args.distill_weight),
                   chunk_size=int(getattr(args, "distill_chunk_size", None) or DEFAULT_CHUNK_SIZE))


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


# --- the LM head and the chunked loss ------------------------------------------------------------


class LMHead(NamedTuple):
    """What turns a final hidden state into logits: ``softcap * tanh(scale * (h W^T + b) / softcap)``."""

    weight: torch.Tensor
    bias: torch.Tensor | None = None
    scale: float = 1.0
    softcap: float | None = None

    @classmethod
    def of(cls, model) -> LMHead:
        """The head of a transformers causal LM, with the logit scaling its ``forward`` applies after it.

        The scaling is read from the config as TRL's fused LM head reads it (``add_fused_lm_head``):
        Cohere's ``logit_scale``, ``output_multiplier``, Falcon-H1's ``lm_head_multiplier``, Granite's and
        MiniCPM3's ``logits_scaling`` (a divisor), Gemma 2/3's ``final_logit_softcapping``.
        """
        head = model.get_output_embeddings()
        if not isinstance(head, torch.nn.Linear):
            raise LNSError(f"distillation reads the LM head's weight, and this model's head is a "
                           f"{type(head).__name__}, not a linear layer (an adapter or modules_to_save on lm_head?)")
        config = model.config.get_text_config()
        scale = getattr(config, "logit_scale", None)
        if scale is None:
            scale = getattr(config, "output_multiplier", None)
        if scale is None:
            scale = getattr(config, "lm_head_multiplier", None)
        if scale is None and getattr(config, "logits_scaling", None) is not None:
            scale = config.logits_scaling if config.model_type == "hyperclovax" else 1 / config.logits_scaling
        return cls(head.weight, head.bias, 1.0 if scale is None else float(scale),
                   getattr(config, "final_logit_softcapping", None))


def _whole(tensor):
    """An FSDP2 shard (DTensor) as the whole tensor; differentiable, so the student's gradient reaches its shards."""
    return tensor.full_tensor() if tensor is not None and hasattr(tensor, "full_tensor") else tensor


@contextlib.contextmanager
def _gathered(*params):
    """Gather ZeRO-3-partitioned parameters for a direct read, as TRL's ``maybe_gather_lm_head_ctx`` does
    (which older TRL releases lack). The loss reads the heads' weights without calling the modules, so
    their gathering hooks never fire; a parameter some module holds gathered already is left alone."""
    unique = {id(p): p for p in params if p is not None and hasattr(p, "ds_status")}
    if not unique:
        yield
        return
    from deepspeed import zero
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    todo = [p for p in unique.values() if p.ds_status != ZeroParamStatus.AVAILABLE]
    with zero.GatheredParameters(todo) if todo else contextlib.nullcontext():
        yield


def _compute_dtype(tensor) -> torch.dtype:
    device_type = tensor.device.type
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else tensor.dtype


def _mm_out_dtype() -> bool:
    """Whether ``torch.mm`` takes ``out_dtype`` (fp32 products of bf16 inputs on CUDA): torch 2.8 and later."""
    from packaging.version import Version

    return Version(torch.__version__.split("+")[0]) >= Version("2.8")


_MM_OUT_DTYPE = _mm_out_dtype()


def _addmm_fp32(accumulator, a, b) -> None:
    """``accumulator += a @ b`` with fp32 products: each chunk's contribution rounded to bf16 before the
    sum would bias the LM head's gradient."""
    if _MM_OUT_DTYPE and accumulator.is_cuda and a.dtype in (torch.bfloat16, torch.float16):
        torch.addmm(accumulator, a, b, out_dtype=torch.float32, out=accumulator)
    else:
        accumulator.addmm_(a.to(accumulator.dtype), b.to(accumulator.dtype))


def _logits(hidden, head: LMHead, weight, bias, dtype) -> torch.Tensor:
    """Logits of a chunk, projected in ``dtype`` as the model's own head projects them, then at least fp32."""
    logits = F.linear(hidden.to(dtype), weight, bias)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    if head.scale != 1.0:
        logits.mul_(head.scale)
    if head.softcap is not None:
        logits.div_(head.softcap).tanh_().mul_(head.softcap)
    return logits


class _Spec(NamedTuple):
    student: LMHead
    teacher: LMHead
    temperature: float
    kl_weight: float
    lm_weight: float
    chunk_size: int
    grads: tuple[bool, bool, bool]  # hidden, weight, bias of the student


def _chunk_loss(hidden, teacher_hidden, target, s_weight, s_bias, t_weight, t_bias, spec: _Spec, dtypes, grads):
    """One chunk's ``(KL sum, LM sum)``; adds its gradient to ``grads`` (hidden rows, weight, bias) when they
    are wanted. A function of its own so that the chunk's (tokens x vocabulary) tiles are freed on return,
    before the next chunk allocates its own."""
    s_dtype, t_dtype = dtypes
    temperature, head = spec.temperature, spec.student
    z = _logits(hidden, head, s_weight, s_bias, s_dtype)
    log_p_teacher = _logits(teacher_hidden, spec.teacher, t_weight, t_bias, t_dtype)
    if temperature != 1.0:
        log_p_teacher.div_(temperature)
    log_p_teacher.sub_(log_p_teacher.logsumexp(-1, keepdim=True))
    p_teacher = log_p_teacher.exp()
    # z is needed again only for the LM loss at another temperature and for the soft cap's derivative
    keep_z = temperature != 1.0 or head.softcap is not None
    log_p = z / temperature if temperature != 1.0 else z.clone() if keep_z else z
    log_p.sub_(log_p.logsumexp(-1, keepdim=True))
    if temperature == 1.0:
        lm_sum = -log_p.gather(1, target).sum()
    else:
        lm_sum = (z.logsumexp(-1) - z.gather(1, target).squeeze(1)).sum()
    # as F.kl_div(log_p, log_p_teacher, log_target=True): exactly 0 where the two agree
    kl_sum = log_p_teacher.sub_(log_p).mul_(p_teacher).sum()
    del log_p_teacher
    grad_hidden, grad_weight, grad_bias = grads
    if grad_hidden is None and grad_weight is None and grad_bias is None:
        return kl_sum, lm_sum
    # d/dz of kl_weight * KL_T + lm_weight * CE: kl_weight / T * (p_T - p_teacher) + lm_weight * (p - onehot)
    grad = log_p.exp_()
    if temperature == 1.0:
        grad.mul_(spec.kl_weight + spec.lm_weight).sub_(p_teacher, alpha=spec.kl_weight)
    else:
        grad.sub_(p_teacher).mul_(spec.kl_weight / temperature)
        if spec.lm_weight:
            grad.add_((z - z.logsumexp(-1, keepdim=True)).exp_(), alpha=spec.lm_weight)
    del p_teacher
    if spec.lm_weight:
        grad.scatter_add_(1, target, grad.new_full(target.shape, -spec.lm_weight))
    if head.softcap is not None:  # z = c tanh(y / c): dz/dy = 1 - (z / c)^2
        grad.mul_(z.div_(head.softcap).square_().neg_().add_(1))
    if head.scale != 1.0:
        grad.mul_(head.scale)
    grad = grad.to(s_dtype)
    if grad_hidden is not None:
        grad_hidden.copy_(grad @ s_weight)
    if grad_weight is not None:
        _addmm_fp32(grad_weight, grad.t(), hidden.to(s_dtype))
    if grad_bias is not None:
        grad_bias += grad.sum(0)
    return kl_sum, lm_sum


class _ChunkedDistillation(torch.autograd.Function):
    """``kl_weight * sum KL + lm_weight * sum CE`` over N tokens, with the gradient computed chunk by chunk in
    the forward pass; also returns the two sums (without gradients) for logging."""

    @staticmethod
    def forward(ctx, student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias,
                targets, spec: _Spec):
        dtypes = s_dtype, t_dtype = _compute_dtype(student_hidden), _compute_dtype(teacher_hidden)
        need_hidden, need_weight, need_bias = spec.grads
        with torch.autocast(student_hidden.device.type, enabled=False):  # every dtype below is chosen explicitly
            s_weight = student_weight.to(s_dtype)  # once, not per chunk
            s_bias = None if student_bias is None else student_bias.to(s_dtype)
            t_weight = teacher_weight.to(t_dtype)
            t_bias = None if teacher_bias is None else teacher_bias.to(t_dtype)
            exact = torch.promote_types(s_dtype, torch.float32)  # sums and the head's gradient: at least fp32
            kl_sum = torch.zeros((), device=student_hidden.device, dtype=exact)
            lm_sum = torch.zeros((), device=student_hidden.device, dtype=exact)
            grad_hidden = torch.zeros_like(student_hidden) if need_hidden else None
            grad_weight = torch.zeros(student_weight.shape, device=student_weight.device, dtype=exact) \
                if need_weight else None
            grad_bias = torch.zeros(student_bias.shape, device=student_bias.device, dtype=exact) if need_bias else None
            for start in range(0, student_hidden.shape[0], spec.chunk_size):
                rows = slice(start, start + spec.chunk_size)
                kl, lm = _chunk_loss(student_hidden[rows], teacher_hidden[rows], targets[rows, None], s_weight, s_bias,
                                     t_weight, t_bias, spec, dtypes,
                                     (None if grad_hidden is None else grad_hidden[rows], grad_weight, grad_bias))
                kl_sum += kl
                lm_sum += lm
        ctx.grads = (grad_hidden,
                     None if grad_weight is None else grad_weight.to(student_weight.dtype),
                     None if grad_bias is None else grad_bias.to(student_bias.dtype))
        ctx.mark_non_differentiable(kl_sum, lm_sum)
        return spec.kl_weight * kl_sum + spec.lm_weight * lm_sum, kl_sum, lm_sum

    @staticmethod
    def backward(ctx, grad_loss, _kl, _lm):
        grads = [None if g is None else g.mul_(grad_loss.to(g.dtype)) for g in ctx.grads]
        ctx.grads = None
        return grads[0], grads[1], grads[2], None, None, None, None, None


def chunked_distillation_loss(student_hidden, student_head: LMHead, teacher_hidden, teacher_head: LMHead, labels,
                              settings: DistillationSettings, num_items_in_batch=None):
    """``(loss, sums)``: ``weight * KL + (1 - weight) * LM`` from final hidden states (batch, seq, hidden), and
    the detached ``[KL sum, LM sum, tokens]`` for logging.

    Position t predicts token t+1; only the positions whose next token carries the loss (label != -100)
    enter the vocabulary-wide softmaxes. Both terms are sums over those tokens divided by their count, or by
    ``num_items_in_batch`` (every micro-batch's tokens, for gradient accumulation) when given. A batch where
    no token carries the loss gives 0, still connected to the student so that every rank's backward matches.
    """
    carries_loss = labels[:, 1:] != -100
    # The one host synchronisation of the loss: how many tokens carry it (boolean indexing would wait for
    # the device once per tensor).
    rows = carries_loss.flatten().nonzero().squeeze(1)
    student_rows = student_hidden[:, :-1].flatten(0, 1).index_select(0, rows)
    teacher_rows = teacher_hidden[:, :-1].flatten(0, 1).index_select(0, rows).detach()
    targets = labels[:, 1:].flatten().index_select(0, rows)
    weight, bias = _whole(student_head.weight), _whole(student_head.bias)
    if teacher_head is student_head:  # LoRA: the adapter leaves the head alone, the teacher's is the student's
        t_weight, t_bias = weight, bias  # the function gives the teacher's inputs no gradient
    else:
        with torch.no_grad():
            t_weight, t_bias = _whole(teacher_head.weight), _whole(teacher_head.bias)
    grad = torch.is_grad_enabled()
    spec = _Spec(student_head, teacher_head, float(settings.temperature), float(settings.weight),
                 1.0 - float(settings.weight), int(settings.chunk_size),
                 (grad and student_rows.requires_grad, grad and weight.requires_grad,
                  grad and bias is not None and bias.requires_grad))
    with _gathered(weight, bias, t_weight, t_bias):
        loss, kl_sum, lm_sum = _ChunkedDistillation.apply(student_rows, weight, bias, teacher_rows, t_weight, t_bias,
                                                           targets, spec)
    tokens = carries_loss.sum()
    if num_items_in_batch is None:
        denominator = tokens.clamp(min=1)
    else:
        denominator = num_items_in_batch.to(loss.device) if torch.is_tensor(num_items_in_batch) else num_items_in_batch
    sums = torch.stack([kl_sum, lm_sum, tokens.to(kl_sum.dtype)]).detach()
    return loss / denominator, sums


def distillation_loss(student_logits, teacher_logits, labels, temperature: float = 1.0, num_items_in_batch=None):
    """KL(teacher || student) per predicted token from whole logits, over the positions whose next token
    carries the LM loss: TRL's generalized JSD at ``beta=0``. The reference the chunked loss is tested against."""
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    from trl.experimental.gkd import GKDTrainer

    carries_loss = labels[:, 1:] != -100
    return GKDTrainer.generalized_jsd_loss(
        student_logits[:, :-1][carries_loss].float(),
        teacher_logits[:, :-1][carries_loss].float(),
        labels=None,
        beta=0.0,
        temperature=temperature,
        num_items_in_batch=num_items_in_batch,
    )


# --- the loss inside the student's forward -------------------------------------------------------


@dataclass
class DistillationOutput(ModelOutput):
    """What the student's forward returns with ``lns_distill``: the loss, and ``[KL sum, LM sum, tokens]``."""

    loss: torch.Tensor | None = None
    sums: torch.Tensor | None = None


class _Target:
    """The teacher's side of one batch, handed to the student's forward (a plain class: FSDP rebuilds the
    dataclasses among a forward's arguments)."""

    def __init__(self, hidden, head_of, settings: DistillationSettings, num_items_in_batch):
        self.hidden, self.head_of = hidden, head_of
        self.settings, self.num_items_in_batch = settings, num_items_in_batch

    def __call__(self, student, hidden, labels) -> DistillationOutput:
        student_head = LMHead.of(student)
        teacher_head = student_head if self.head_of is None else LMHead.of(self.head_of)
        loss, sums = chunked_distillation_loss(hidden, student_head, self.hidden, teacher_head, labels,
                                               self.settings, self.num_items_in_batch)
        return DistillationOutput(loss=loss, sums=sums)


def install_distillation_forward(model) -> None:
    """Let ``model(..., lns_hidden_states=True)`` return the backbone's output without the LM head, and
    ``model(..., labels=labels, lns_distill=target)`` compute the distillation loss; any other call is the
    model's own forward. ``model`` is the transformers model (inside PEFT's wrapper); installed before
    accelerate wraps ``forward`` for mixed precision, and looked up on each call, as FSDP and PEFT replace
    modules after this."""
    if getattr(model, "_lns_distillation_forward", False):
        return
    # unbound, so that a deep copy of the model calls its own forward, not this one's
    previous = model.forward.__func__

    @functools.wraps(type(model).forward)  # generate and the Trainer read the signature
    def forward(self, *args, lns_distill=None, lns_hidden_states=False, labels=None, **kwargs):
        if lns_distill is None and not lns_hidden_states:
            if labels is not None:
                kwargs["labels"] = labels
            return previous(self, *args, **kwargs)
        kwargs["use_cache"] = False
        outputs = self.base_model(*args, **kwargs)
        if lns_distill is None:
            return outputs
        return lns_distill(self, outputs.last_hidden_state, labels)

    model.forward = types.MethodType(forward, model)
    model._lns_distillation_forward = True


# --- the teacher ---------------------------------------------------------------------------------


class SourceTeacher:
    """The source model's side of distillation: its own prepared model (full fine-tuning), or, with
    ``model=None``, the LoRA student with its adapter off and LNS strength 0."""

    def __init__(self, model=None):
        self.model = model
        self.core = model  # the unwrapped model, whose LM head the loss reads
        self._unwrap = unwrap

    @classmethod
    def load(cls, args, training, model_config, tokenizer, student) -> SourceTeacher:
        """The checkpoint the student came from, as its own frozen model in the training dtype: a stock source
        loads as stock (not converted), an LNS checkpoint runs at strength 0. Loaded like the student (same
        attention, init kwargs, ZeRO-3 partitioning at load, rank-0-only weights under FSDP's CPU-RAM-efficient
        loading until ``prepare`` broadcasts them)."""
        from lns_surgery.training import models

        if args.init_preset is not None:
            raise LNSError("distill heals a converted checkpoint towards its source; a model built from scratch "
                           "(init_preset) has none")
        dtype = "bfloat16" if training.bf16 else "float16" if training.fp16 else model_config.dtype
        teacher = models.load_model(dataclasses.replace(args, lns_convert=False, lns_ramp_steps=0), training,
                                    dataclasses.replace(model_config, dtype=dtype), tokenizer=tokenizer)
        vocab = student.config.get_text_config().vocab_size
        if teacher.config.get_text_config().vocab_size != vocab:
            # The student's embeddings grew for an added pad token; the teacher needs the same vocabulary, and
            # every rank the same new rows (mean resizing samples them).
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                teacher.resize_token_embeddings(vocab)
        teacher.requires_grad_(False)
        teacher.eval()
        if lns_status(teacher.config).kind == "lns":
            teacher.set_lns_alpha(0.0)
        install_distillation_forward(teacher)
        return cls(teacher)

    def prepare(self, trainer) -> None:
        """Shard or place the teacher like the student, once the trainer's accelerator exists (as TRL's
        trainers prepare theirs): ZeRO-3 partitions it (``prepare_deepspeed``); FSDP2 shards it with
        accelerate's own preparation, block by block like the student, which broadcasts rank 0's weights
        under CPU-RAM-efficient loading (TRL's ``prepare_fsdp`` shards only the root and broadcasts nothing,
        so ranks other than 0 would keep zeros); otherwise it is placed on this rank's device."""
        accelerator = trainer.accelerator
        self._unwrap = accelerator.unwrap_model
        if self.model is None:
            return
        if trainer.is_deepspeed_enabled:
            from trl.models.utils import prepare_deepspeed

            self.model = prepare_deepspeed(self.model, accelerator)
        elif trainer.is_fsdp_enabled:
            if getattr(accelerator.state.fsdp_plugin, "fsdp_version", 1) != 2:
                raise LNSError("distill with full fine-tuning under FSDP needs fsdp_version: 2 (FSDP1 keeps the "
                               "teacher's LM head sharded outside its forward); use recipes/accelerate/fsdp.yaml")
            from accelerate.utils import fsdp2_prepare_model

            self.model = fsdp2_prepare_model(accelerator, self.model)
        else:
            self.model = accelerator.prepare_model(self.model, evaluation_mode=True)
        self.model.eval()
        self.core = accelerator.unwrap_model(self.model)

    def _student_as_teacher(self, model):
        peft_model = self._unwrap(model)  # called directly: a DDP wrapper has nothing to synchronise here
        if not _is_peft(peft_model):
            raise TypeError("a teacher without its own model needs a PEFT (LoRA) student")
        return peft_model

    @torch.no_grad()
    def hidden_states(self, model, inputs: dict) -> torch.Tensor:
        """The source model's final hidden states for a batch (no LM head)."""
        if self.model is not None:
            return self.model(**inputs, lns_hidden_states=True).last_hidden_state
        peft_model = self._student_as_teacher(model)
        with peft_model.disable_adapter(), _lns_strength(peft_model, 0.0), _eval_mode(peft_model):
            return peft_model(**inputs, lns_hidden_states=True).last_hidden_state

    def target(self, model, inputs: dict, settings: DistillationSettings, num_items_in_batch=None) -> _Target:
        """The teacher's side of a batch, for ``model(..., lns_distill=target)``."""
        return _Target(self.hidden_states(model, inputs), self.core, settings, num_items_in_batch)

    @torch.no_grad()
    def logits(self, model, inputs: dict) -> torch.Tensor:
        """The source model's whole logits (for checks; under FSDP and ZeRO-3 every rank must call it)."""
        if self.model is not None:
            return self.model(**inputs).logits
        peft_model = self._student_as_teacher(model)
        with peft_model.disable_adapter(), _lns_strength(peft_model, 0.0), _eval_mode(peft_model):
            return peft_model(**inputs).logits

    def parameters(self):
        return [] if self.model is None else list(self.model.parameters())


# --- the trainer ---------------------------------------------------------------------------------


def distillation_trainer_class(base):
    """A subclass of the trainer class ``base`` (an SFTTrainer) whose loss is distillation from the source."""

    class DistillationTrainer(base):
        """Heals by distillation from the source model. The per-step KL and LM sums stay on the device and
        are reduced across processes only when the trainer logs: no host synchronisation per step."""

        def __init__(self, *args, distillation: DistillationSettings, teacher: SourceTeacher, **kwargs):
            super().__init__(*args, **kwargs)
            self.distillation = distillation
            self.teacher = teacher
            self._distillation_sums: dict[str, torch.Tensor] = {}
            student = _lns_model(self.model)
            LMHead.of(student)  # refuses a head the loss cannot read, before any step
            install_distillation_forward(student)
            teacher.prepare(self)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            mode = "train" if self.model.training else "eval"
            inputs = {**inputs, "use_cache": False}
            labels = inputs.pop("labels")
            target = self.teacher.target(model, inputs, self.distillation, num_items_in_batch)
            outputs = model(**inputs, labels=labels, lns_distill=target)
            loss = outputs.loss
            if self.args.average_tokens_across_devices and num_items_in_batch is not None:
                # As TRL's SFTTrainer: num_items_in_batch counts every rank's tokens and DDP averages gradients.
                loss = loss * self.accelerator.num_processes
            pending = self._distillation_sums.get(mode)
            self._distillation_sums[mode] = outputs.sums if pending is None else pending + outputs.sums
            return (loss, outputs) if return_outputs else loss

        def log(self, logs, start_time=None):
            # Every process logs at the same steps (the Trainer gathers the loss there too), so the one
            # reduction here is collective; the metrics are per-token means over the logging window.
            mode = "train" if self.model.training else "eval"
            pending = self._distillation_sums.pop(mode, None)
            if pending is not None:
                kl_sum, lm_sum, tokens = self.accelerator.reduce(pending, reduction="sum").tolist()
                self._metrics[mode]["distill_loss"] = [kl_sum / tokens if tokens else 0.0]
                self._metrics[mode]["lm_loss"] = [lm_sum / tokens if tokens else 0.0]
            super().log(logs, start_time)

    return DistillationTrainer
