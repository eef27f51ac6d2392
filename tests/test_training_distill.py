"""Healing by distillation from the source model, and frozen norms, on the real stories260K."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from conftest import shared_path
from lns_surgery.core.errors import LNSError
from lns_surgery.training.distill import (
    DistillationSettings,
    LMHead,
    SourceTeacher,
    chunked_distillation_loss,
    distillation_loss,
    install_distillation_forward,
)
from lns_surgery.training.recipe import recipe_from_dict
from lns_surgery.training.run import build_trainer, train_from_dict

IDS = [1, 403, 407, 261, 378, 275, 261, 157, 29, 13]


def _settings(stories_path, tmp_path, **extra):
    c4 = shared_path("data/c4-sample/c4_sample300.jsonl")
    return {"model_name_or_path": str(stories_path), "lns_convert": True, "output_dir": str(tmp_path / "out"),
            "dataset_name": str(c4), "max_train_samples": 40, "max_length": 64, "per_device_train_batch_size": 4,
            "max_steps": 4, "learning_rate": 5e-3, "logging_steps": 1, "activation_checkpointing": False,
            "use_cpu": True, "report_to": "none", "disable_tqdm": True, "seed": 0, "distill": True, **extra}


def _source_logits(stories_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(stories_path).eval()
    with torch.no_grad():
        return model(torch.tensor([IDS])).logits


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_distillation_starts_at_zero_under_the_ramp_and_the_teacher_stays_the_source(stories_path, tmp_path, lora):
    settings = _settings(stories_path, tmp_path, lns_ramp_steps=4, use_peft=lora, lora_r=4, lora_alpha=8,
                         lora_dropout=0.0, export="merged")
    recipe = recipe_from_dict(settings, "pretrain")
    trainer, _ = build_trainer(recipe)
    assert trainer.distillation == DistillationSettings(temperature=1.0, weight=1.0)  # typed, from the recipe
    trainer.train()
    distill = [entry["distill_loss"] for entry in trainer.state.log_history if "distill_loss" in entry]
    assert len(distill) == 4
    # Step 1 runs at alpha 0 from the source weights: the student is the teacher, exactly.
    assert distill[0] == 0.0
    assert all(value > 0.0 for value in distill[1:]), distill
    lm = [entry["lm_loss"] for entry in trainer.state.log_history if "lm_loss" in entry]
    assert len(lm) == 4 and all(value > 0 for value in lm)

    # After training, the teacher still computes the source checkpoint's function.
    ids = torch.tensor([IDS])
    teacher_logits = trainer.teacher.logits(trainer.model, {"input_ids": ids})
    torch.testing.assert_close(teacher_logits, _source_logits(stories_path), rtol=0, atol=1e-5)
    # ... while the student has moved away from it (the ramp reached full LNS and weights trained).
    trainer.model.eval()
    with torch.no_grad():
        student_logits = trainer.model(input_ids=ids).logits
    assert (student_logits - teacher_logits).abs().max() > 1e-3
    if not lora:
        # its own model, loaded from the checkpoint as it is (a stock source stays stock), sharing nothing
        assert type(trainer.teacher.model).__name__ == "LlamaForCausalLM"
        student_storage = {p.data_ptr() for p in trainer.model.parameters()}
        source = load_file(stories_path / "model.safetensors")
        for name, parameter in trainer.teacher.model.named_parameters():
            assert not parameter.requires_grad and parameter.grad is None
            assert parameter.data_ptr() not in student_storage
            if name in source:
                assert torch.equal(parameter, source[name]), name


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_gradients_reach_only_the_student(stories_path, tmp_path, lora):
    recipe = recipe_from_dict(_settings(stories_path, tmp_path, use_peft=lora, lora_r=4, lora_alpha=8), "pretrain")
    trainer, _ = build_trainer(recipe)
    batch = next(iter(trainer.get_train_dataloader()))
    trainer.model.train()
    with torch.no_grad():  # make the adapter non-trivial so the student differs from the teacher
        for name, parameter in trainer.model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.05)
    loss = trainer.compute_loss(trainer.model, dict(batch))
    loss.backward()
    trainable = [(name, p) for name, p in trainer.model.named_parameters() if p.requires_grad]
    assert trainable and all(p.grad is not None for _, p in trainable)
    frozen_student = [(name, p) for name, p in trainer.model.named_parameters() if not p.requires_grad]
    assert all(p.grad is None for _, p in frozen_student)
    assert all(p.grad is None and not p.requires_grad for p in trainer.teacher.parameters())
    if lora:
        assert trainer.teacher.model is None  # no second copy of the weights
        assert all("lora_" in name for name, _ in trainable)


def _logged(trainer, mode):
    """What the trainer logs for its accumulated distillation metrics in ``mode``."""
    trainer.model.train(mode == "train")
    trainer.log({})
    return trainer.state.log_history[-1]


def test_the_mix_of_distillation_and_lm_loss_follows_the_weight(stories_path, tmp_path):
    losses, logged = {}, {}
    for weight in (0.0, 1.0, 0.25):
        recipe = recipe_from_dict(_settings(stories_path, tmp_path, use_peft=False, distill_weight=weight), "pretrain")
        trainer, _ = build_trainer(recipe)
        batch = next(iter(trainer.get_train_dataloader()))
        trainer.model.eval()
        with torch.no_grad():
            losses[weight] = trainer.compute_loss(trainer.model, dict(batch)).item()
        logged[weight] = _logged(trainer, "eval")
    distill, lm = logged[0.25]["eval_distill_loss"], logged[0.25]["eval_lm_loss"]
    for weight in (0.0, 1.0):  # the same batch and model: the same two terms whatever the weight
        assert logged[weight]["eval_distill_loss"] == pytest.approx(distill, rel=1e-6)
        assert logged[weight]["eval_lm_loss"] == pytest.approx(lm, rel=1e-6)
    assert losses[0.0] == pytest.approx(lm, rel=1e-6)
    assert losses[1.0] == pytest.approx(distill, rel=1e-6)
    assert losses[0.25] == pytest.approx(0.25 * distill + 0.75 * lm, rel=1e-6)
    assert distill > 0  # full LNS from the first step: the student is not the source


def test_metrics_stay_on_the_device_until_the_trainer_logs(stories_path, tmp_path):
    """Per step, the KL and LM sums are added up as tensors (no host synchronisation); the log reports
    per-token means over the window, the LM one equal to the model's own loss on those tokens."""
    recipe = recipe_from_dict(_settings(stories_path, tmp_path, use_peft=False, distill_weight=0.5), "pretrain")
    trainer, _ = build_trainer(recipe)
    batches = iter(trainer.get_train_dataloader())
    trainer.model.train()
    kl_total, lm_total, tokens = 0.0, 0.0, 0
    for cut in (20, 0):  # the two batches carry the loss on different numbers of tokens
        batch = next(batches)
        batch["labels"][0, :cut] = -100
        loss = trainer.compute_loss(trainer.model, dict(batch))
        loss.backward()
        assert "distill_loss" not in trainer._metrics["train"]  # nothing turned into numbers yet
        pending = trainer._distillation_sums["train"]
        assert torch.is_tensor(pending) and pending.shape == (3,)
        with torch.no_grad():
            student = trainer.model(input_ids=batch["input_ids"], labels=batch["labels"])
            teacher = trainer.teacher.logits(trainer.model, {"input_ids": batch["input_ids"]})
            kl = distillation_loss(student.logits, teacher, batch["labels"]).item()
        assert loss.item() == pytest.approx(0.5 * kl + 0.5 * student.loss.item(), rel=1e-5)
        count = int((batch["labels"][:, 1:] != -100).sum())
        kl_total, lm_total, tokens = kl_total + kl * count, lm_total + student.loss.item() * count, tokens + count
    entry = _logged(trainer, "train")
    assert entry["lm_loss"] == pytest.approx(lm_total / tokens, rel=1e-5)
    assert entry["distill_loss"] == pytest.approx(kl_total / tokens, rel=1e-5)
    assert "train" not in trainer._distillation_sums  # the window starts again


def _reference(student_hidden, student_head, teacher_hidden, teacher_head, labels, settings, num_items_in_batch):
    """The unchunked loss from whole logits: TRL's per-row KL and the model's cross-entropy."""
    def logits(hidden, head):
        z = F.linear(hidden, head.weight, head.bias) * head.scale
        return z if head.softcap is None else head.softcap * torch.tanh(z / head.softcap)

    student, teacher = logits(student_hidden, student_head), logits(teacher_hidden, teacher_head)
    kl = distillation_loss(student, teacher, labels, settings.temperature, num_items_in_batch)
    lm = F.cross_entropy(student[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), reduction="sum")
    lm = lm / (num_items_in_batch if num_items_in_batch is not None else (labels[:, 1:] != -100).sum().clamp(min=1))
    return settings.weight * kl + (1 - settings.weight) * lm, kl, lm


@pytest.mark.parametrize("chunk_size", [1, 3, 1024])
@pytest.mark.parametrize("weight,temperature,scale,softcap", [(1.0, 1.0, 1.0, None), (0.25, 2.0, 0.5, 3.0),
                                                                (0.0, 1.0, 1.0, None), (0.6, 0.7, 1.0, 2.0)])
def test_chunked_loss_and_gradients_equal_the_unchunked_loss(chunk_size, weight, temperature, scale, softcap):
    torch.manual_seed(0)
    batch, seq, hidden, vocab = 3, 6, 8, 13
    student_hidden = torch.randn(batch, seq, hidden, requires_grad=True)
    teacher_hidden = torch.randn(batch, seq, hidden)
    student = LMHead(torch.randn(vocab, hidden, requires_grad=True), torch.randn(vocab, requires_grad=True),
                     scale, softcap)
    teacher = LMHead(torch.randn(vocab, hidden), None, scale, softcap)
    labels = torch.randint(0, vocab, (batch, seq))
    labels[0, :4] = -100
    labels[2] = -100  # a row without loss tokens
    settings = DistillationSettings(temperature=temperature, weight=weight, chunk_size=chunk_size)
    inputs = (student_hidden, student.weight, student.bias)
    for num_items in (None, torch.tensor(29)):  # 29: every micro-batch's tokens, under gradient accumulation
        loss, sums = chunked_distillation_loss(student_hidden, student, teacher_hidden, teacher, labels, settings,
                                               num_items)
        expected, kl, lm = _reference(student_hidden, student, teacher_hidden, teacher, labels, settings, num_items)
        torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
        for got, want in zip(torch.autograd.grad(loss, inputs), torch.autograd.grad(expected, inputs)):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        count = num_items if num_items is not None else sums[2]
        assert sums[2] == 7  # the tokens that carry the loss, after the shift: 2 in row 0, 5 in row 1
        torch.testing.assert_close(sums[0] / count, kl, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(sums[1] / count, lm, rtol=1e-5, atol=1e-6)


def test_a_batch_without_loss_tokens_gives_zero_and_a_connected_graph():
    student_hidden = torch.randn(2, 5, 4, requires_grad=True)
    student = LMHead(torch.randn(7, 4, requires_grad=True))
    labels = torch.full((2, 5), -100)
    loss, sums = chunked_distillation_loss(student_hidden, student, torch.randn(2, 5, 4), LMHead(torch.randn(7, 4)),
                                           labels, DistillationSettings(weight=0.5))
    loss.backward()  # every rank runs the same backward, whatever its batch held
    assert loss.item() == 0.0 and sums.tolist() == [0.0, 0.0, 0.0]
    assert torch.count_nonzero(student_hidden.grad) == 0 and torch.count_nonzero(student.weight.grad) == 0


@pytest.mark.parametrize("model_type", ["llama", "gemma2", "granite", "cohere", "gpt2"])
def test_the_loss_reads_each_architectures_logits_as_its_forward_computes_them(model_type):
    """Gemma 2 soft-caps, Granite divides, Cohere multiplies the head's output: the chunked loss, computed
    inside the student's forward from hidden states, equals the one from the models' own logits."""
    from tiny_models import tiny_config
    from transformers import AutoModelForCausalLM

    config = tiny_config(model_type)
    if model_type == "gemma2":
        config.final_logit_softcapping = 2.0  # small enough to bend these logits
    if model_type == "granite":
        config.logits_scaling = 4.0  # its default, 1, would not show a head that ignored it
    torch.manual_seed(0)
    student = AutoModelForCausalLM.from_config(config).eval()  # no dropout (GPT-2 has some): two forwards agree
    teacher = AutoModelForCausalLM.from_config(config).eval()
    install_distillation_forward(student)
    install_distillation_forward(teacher)
    ids = torch.randint(3, config.vocab_size, (2, 9))
    labels = ids.clone()
    labels[1, :4] = -100
    settings = DistillationSettings(temperature=1.5, weight=0.5, chunk_size=4)
    target = SourceTeacher(teacher).target(student, {"input_ids": ids}, settings)
    loss = student(input_ids=ids, labels=labels, lns_distill=target).loss
    with torch.no_grad():
        teacher_logits = teacher(input_ids=ids).logits
    student_logits = student(input_ids=ids).logits
    kl = distillation_loss(student_logits, teacher_logits, labels, settings.temperature)
    lm = F.cross_entropy(student_logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())
    expected = 0.5 * kl + 0.5 * lm
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    parameters = [p for p in student.parameters() if p.requires_grad]
    for got, want in zip(torch.autograd.grad(loss, parameters), torch.autograd.grad(expected, parameters)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_distillation_settings_are_checked():
    with pytest.raises(LNSError, match="chunk size"):
        DistillationSettings(chunk_size=0)
    with pytest.raises(LNSError, match="distill_weight"):
        DistillationSettings(weight=1.5)
    with pytest.raises(LNSError, match="temperature"):
        DistillationSettings(temperature=0.0)
    with pytest.raises(LNSError, match="from scratch"):
        SourceTeacher.load(SimpleNamespace(init_preset="llama-130m"), None, None, None, None)


def test_frozen_norms_keep_the_scaling_while_the_rest_trains(stories_path, tmp_path):
    result = train_from_dict(_settings(stories_path, tmp_path, use_peft=False, distill=False, heal_norms="freeze"),
                             "pretrain")
    source = load_file(stories_path / "model.safetensors")
    trained = load_file(result.output_dir / "model.safetensors")
    norms = [key for key in source if "input_layernorm" in key or "post_attention_layernorm" in key]
    assert len(norms) == 10
    for key in norms:
        assert torch.equal(trained[key], source[key]), key
    assert not torch.equal(trained["model.layers.2.mlp.up_proj.weight"], source["model.layers.2.mlp.up_proj.weight"])
    assert not torch.equal(trained["model.norm.weight"], source["model.norm.weight"])  # only the scaled norms freeze


def test_heal_norms_refusals(stories_path, tmp_path):
    with pytest.raises(LNSError, match="contradict"):
        recipe_from_dict(_settings(stories_path, tmp_path, heal_norms="freeze", train_norms=True), "sft")
    with pytest.raises(LNSError, match="heal_norms"):
        recipe_from_dict(_settings(stories_path, tmp_path, heal_norms="sometimes"), "pretrain")
    with pytest.raises(LNSError, match="needs an LNS model"):
        build_trainer(recipe_from_dict(_settings(stories_path, tmp_path, lns_convert=False, use_peft=False,
                                                 heal_norms="freeze"), "pretrain"))
