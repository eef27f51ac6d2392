"""Healing by distillation from the source model, and frozen norms, on the real stories260K."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from conftest import shared_path
from lns_surgery.core.errors import LNSError
from lns_surgery.training.distill import distillation_loss
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


def _logged(result, key):
    return [entry[key] for entry in result.metrics["log_history"] if key in entry]


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_distillation_starts_at_zero_under_the_ramp_and_the_teacher_stays_the_source(stories_path, tmp_path, lora):
    settings = _settings(stories_path, tmp_path, lns_ramp_steps=4, use_peft=lora, lora_r=4, lora_alpha=8,
                         lora_dropout=0.0, export="merged")
    recipe = recipe_from_dict(settings, "pretrain")
    trainer, _ = build_trainer(recipe)
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
        source = load_file(stories_path / "model.safetensors")
        for name, parameter in trainer.teacher.frozen.named_parameters():
            assert not parameter.requires_grad and parameter.grad is None
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
        assert trainer.teacher.frozen is None  # no second copy of the weights
        assert all("lora_" in name for name, _ in trainable)


def test_the_mix_of_distillation_and_lm_loss_follows_the_weight(stories_path, tmp_path):
    losses = {}
    for weight in (0.0, 1.0, 0.25):
        recipe = recipe_from_dict(_settings(stories_path, tmp_path, use_peft=False, distill_weight=weight), "pretrain")
        trainer, _ = build_trainer(recipe)
        batch = next(iter(trainer.get_train_dataloader()))
        trainer.model.eval()
        with torch.no_grad():
            losses[weight] = trainer.compute_loss(trainer.model, dict(batch)).item()
        distill, lm = trainer._metrics["eval"]["distill_loss"][-1], trainer._metrics["eval"]["lm_loss"][-1]
    assert losses[0.0] == pytest.approx(lm, rel=1e-6)
    assert losses[1.0] == pytest.approx(distill, rel=1e-6)
    assert losses[0.25] == pytest.approx(0.25 * distill + 0.75 * lm, rel=1e-6)
    assert distill > 0  # full LNS from the first step: the student is not the source


def test_distillation_loss_is_kl_from_the_teacher_on_loss_tokens():
    torch.manual_seed(0)
    student, teacher = torch.randn(2, 5, 7), torch.randn(2, 5, 7)
    labels = torch.tensor([[-100, 3, 4, -100, 1], [-100, -100, 2, 2, 2]])
    expected, count = 0.0, 0
    for b in range(2):
        for t in range(4):
            if labels[b, t + 1] != -100:
                p = torch.softmax(teacher[b, t] / 2.0, -1)
                q = torch.softmax(student[b, t] / 2.0, -1)
                expected += (p * (p.log() - q.log())).sum().item()
                count += 1
    actual = distillation_loss(student, teacher, labels, temperature=2.0)
    assert actual.item() == pytest.approx(expected / count, rel=1e-5)
    # gradient accumulation: the sum over these tokens, divided by every micro-batch's token count
    accumulated = distillation_loss(student, teacher, labels, temperature=2.0, num_items_in_batch=torch.tensor(3 * count))
    assert accumulated.item() == pytest.approx(expected / (3 * count), rel=1e-5)
    assert distillation_loss(teacher, teacher, labels).item() == 0.0
    # no token carries the loss (a reply truncated away): zero, and still a graph to backpropagate
    student.requires_grad_(True)
    empty = distillation_loss(student, teacher, torch.full_like(labels, -100))
    empty.backward()
    assert empty.item() == 0.0 and torch.count_nonzero(student.grad) == 0


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
