"""Data formats and which tokens carry loss, checked on the trainer's prepared datasets (nothing is trained)."""

from __future__ import annotations

import json

import pytest

from conftest import shared_path
from lns_surgery.core.errors import LNSError
from lns_surgery.training import data
from lns_surgery.training.recipe import recipe_from_dict
from lns_surgery.training.run import build_trainer


def _settings(stories_path, tmp_path, **extra):
    return {
        "model_name_or_path": str(stories_path), "lns_convert": True, "output_dir": str(tmp_path / "out"),
        "max_steps": 1, "activation_checkpointing": False, "use_cpu": True, "report_to": "none",
        "max_length": 256, "max_train_samples": 8, **extra,
    }


def _loss_text(trainer, index=0):
    example = trainer.train_dataset[index]
    tokenizer = trainer.processing_class
    trained = [t for t, label in zip(example["input_ids"], example["labels"]) if label != -100]
    return tokenizer.decode(example["input_ids"]), tokenizer.decode(trained), example


def test_alpaca_trains_only_the_response(stories_path, tmp_path):
    path = shared_path("data/alpaca/alpaca_first100.json")
    records = json.loads(path.read_text())
    trainer, info = build_trainer(recipe_from_dict(_settings(stories_path, tmp_path, dataset_name=str(path)), "sft"))
    assert info["dataset_format"] == "alpaca"  # detected from instruction/input/output (the records also have text)
    tokenizer = trainer.processing_class
    for index in (0, 1):
        full, trained, _ = _loss_text(trainer, index)
        record = records[index]
        prompt = data.alpaca_prompt(record["instruction"], record["input"])
        assert full.replace(" ", "").startswith(prompt.replace(" ", "")[:40])
        assert "### Response:" in full and "### Response:" not in trained
        # the trained tokens are the response and the EOS, nothing of the prompt
        assert trained.replace(" ", "") == (record["output"] + tokenizer.eos_token).replace(" ", "")


def test_alpaca_prompt_is_the_standard_one():
    assert data.alpaca_prompt("Add 2 and 3.") == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the "
        "request.\n\n### Instruction:\nAdd 2 and 3.\n\n### Response:\n")
    with_input = data.alpaca_prompt("Add.", "2 and 3")
    assert "paired with an input" in with_input and "### Input:\n2 and 3\n\n### Response:\n" in with_input
    assert data.alpaca_prompt("Add.", "  ") == data.alpaca_prompt("Add.")


def test_chat_without_template_gets_chatml_and_assistant_only_loss(stories_path, tmp_path):
    path = shared_path("data/dolly-chat/dolly_2k_chat.jsonl")
    first = json.loads(path.read_text().splitlines()[0])["messages"]
    settings = _settings(stories_path, tmp_path, dataset_name=str(path), assistant_only_loss=True)
    trainer, info = build_trainer(recipe_from_dict(settings, "sft"))
    assert info["dataset_format"] == "messages"
    tokenizer = trainer.processing_class
    assert "generation %}" in tokenizer.chat_template
    # stories260K has no ChatML markers: its own BOS/EOS mark the turns, nothing is added to the vocabulary
    assert info["added_token_ids"] == [] and len(tokenizer) == 512
    full, trained, example = _loss_text(trainer)
    assistant = next(m["content"] for m in first if m["role"] == "assistant")
    user = next(m["content"] for m in first if m["role"] == "user")
    assert full.replace(" ", "").startswith("<s>system")
    assert user.replace(" ", "") in full.replace(" ", "")
    # exactly the assistant's reply and the EOS that ends its turn are trained
    assert trained.replace(" ", "") == (assistant + tokenizer.eos_token).replace(" ", "")
    assert example["labels"][-1] == -100  # the newline after the turn is not


def test_chatml_markers_are_used_when_the_vocabulary_has_them(stories_path):
    from lns_surgery.loading import load_tokenizer

    tokenizer = load_tokenizer(str(stories_path))
    tokenizer.add_tokens(["<|im_start|>", "<|im_end|>"], special_tokens=True)
    assert data.chatml_for(tokenizer) == data.CHATML_TEMPLATE
    tokenizer.chat_template = data.CHATML_TEMPLATE
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    assert tokenizer.apply_chat_template(messages, tokenize=False) == (
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello<|im_end|>\n")
    rendered = tokenizer.apply_chat_template(messages, return_dict=True, return_assistant_tokens_mask=True)
    trained = [t for t, m in zip(rendered["input_ids"], rendered["assistant_masks"]) if m]
    assert tokenizer.decode(trained).replace(" ", "") == "Hello<|im_end|>"


def test_chat_with_own_template_and_full_loss(stories_path, tmp_path):
    path = shared_path("data/dolly-chat/dolly_2k_chat.jsonl")
    template = tmp_path / "plain.jinja"
    template.write_text("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}")
    settings = _settings(stories_path, tmp_path, dataset_name=str(path), chat_template=str(template))
    trainer, info = build_trainer(recipe_from_dict(settings, "sft"))
    assert info["added_token_ids"] == []
    full, trained, example = _loss_text(trainer)
    assert full.startswith("system:") and "assistant:" in full
    assert all(label != -100 for label in example["labels"])  # without assistant_only_loss every token trains


def test_text_packs_and_trains_every_token(stories_path, tmp_path):
    path = shared_path("data/c4-sample/c4_sample300.jsonl")
    settings = _settings(stories_path, tmp_path, dataset_name=str(path), max_length=64, max_train_samples=20,
                         use_peft=False)
    trainer, info = build_trainer(recipe_from_dict(settings, "pretrain"))
    assert info["dataset_format"] == "text" and not info["lora"]
    lengths = [len(example["input_ids"]) for example in trainer.train_dataset]
    # pre-training packs "wrapped": documents are concatenated and cut into full windows, none dropped
    assert set(lengths[:-1]) == {64} and sum(lengths) > 20 * 64
    example = trainer.train_dataset[0]
    assert example["labels"] == example["input_ids"]
    batch = trainer.data_collator([trainer.train_dataset[0], trainer.train_dataset[1]])
    assert batch["input_ids"].shape == (2, 64)
    assert "attention_mask" not in batch or bool(batch["attention_mask"].all())  # no padding anywhere
    assert trainer.processing_class.pad_token is not None  # set although stories260K has none


def test_sft_packing_is_padding_free(stories_path, tmp_path):
    """SFT with packing: one flat row, positions restart at each record, no attention mask (sdpa keeps
    the records apart through position_ids)."""
    path = shared_path("data/alpaca/alpaca_first100.json")
    settings = _settings(stories_path, tmp_path, dataset_name=str(path), packing=True, max_length=512)
    trainer, info = build_trainer(recipe_from_dict(settings, "sft"))
    assert info["dataset_format"] == "alpaca"
    batch = trainer.data_collator([trainer.train_dataset[0], trainer.train_dataset[1]])
    assert "attention_mask" not in batch and batch["input_ids"].shape[0] == 1
    assert int((batch["position_ids"][0] == 0).sum()) >= 2


def test_prompt_completion_and_text_files(stories_path, tmp_path):
    records = [{"prompt": f"Question {i}? ", "completion": f"Answer number {i}."} for i in range(6)]
    path = tmp_path / "pc.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records))
    trainer, info = build_trainer(recipe_from_dict(_settings(stories_path, tmp_path, dataset_name=str(path)), "sft"))
    assert info["dataset_format"] == "prompt_completion"
    _, trained, _ = _loss_text(trainer)
    assert trained.replace(" ", "") == ("Answer number 0." + trainer.processing_class.eos_token).replace(" ", "")

    text_file = tmp_path / "story.txt"
    text_file.write_text("Once upon a time there was a cat.\nThe cat liked milk.\n" * 5)
    loaded = data.load_split(str(text_file), None, "train", streaming=False)
    assert loaded.column_names == ["text"] and len(loaded) == 10


def test_streaming_local_file_with_held_out_records(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text("\n".join(json.dumps({"text": f"document {i}"}) for i in range(10)))
    args = recipe_from_dict({"dataset_name": str(path), "dataset_streaming": True, "max_eval_samples": 3},
                            "pretrain").args
    train, evaluation = data.load_datasets(args)
    assert [r["text"] for r in evaluation] == ["document 0", "document 1", "document 2"]
    assert [r["text"] for r in train][0] == "document 3"
    args.eval_fraction = 0.1
    with pytest.raises(LNSError, match="streamed dataset"):
        data.load_datasets(args)


@pytest.mark.parametrize("columns, expected", [
    (["messages"], "messages"), (["conversations"], "messages"), (["prompt", "completion"], "prompt_completion"),
    (["instruction", "input", "output", "text"], "alpaca"), (["text", "meta"], "text"),
])
def test_detect_format(columns, expected):
    assert data.detect_format(columns) == expected


def test_unrecognised_columns_and_missing_data(tmp_path):
    with pytest.raises(LNSError, match="cannot tell the dataset's format from its columns \\(a, b\\)"):
        data.detect_format(["a", "b"])
    with pytest.raises(LNSError, match="could not load dataset"):
        data.load_split("no-such-user/no-such-dataset", None, "train", streaming=False)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(LNSError, match="holds no"):
        data.load_split(str(empty), None, "train", streaming=False)
    with pytest.raises(LNSError, match="chat_template must be"):
        data.resolve_chat_template("not a template")


def test_wrong_loss_option_for_format(stories_path, tmp_path):
    path = shared_path("data/alpaca/alpaca_first100.json")
    settings = _settings(stories_path, tmp_path, dataset_name=str(path), assistant_only_loss=True)
    with pytest.raises(LNSError, match="assistant_only_loss needs chat"):
        build_trainer(recipe_from_dict(settings, "sft"))
