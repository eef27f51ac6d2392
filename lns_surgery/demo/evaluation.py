"""Measuring a model on the demo's data: held-out perplexity, greedy answers, exact-match accuracy.

Every function takes a loaded causal LM (stock, LNS or PEFT-wrapped) and the demo tokenizer, runs
on the model's device in eval mode under ``torch.no_grad()``, and leaves the model's train/eval mode
as it found it.
"""

from __future__ import annotations

import math
from collections import defaultdict
from contextlib import contextmanager
from typing import Sequence

from lns_surgery.demo import data


@contextmanager
def _evaluating(model):
    import torch

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def _device(model):
    return next(model.parameters()).device


def perplexity(model, blocks: Sequence[Sequence[int]], batch_size: int = 32) -> float:
    """exp(mean negative log-likelihood) of every next token in ``blocks`` (equal-length id lists)."""
    import torch
    import torch.nn.functional as F

    device = _device(model)
    total_nll, total_tokens = 0.0, 0
    with _evaluating(model):
        for start in range(0, len(blocks), batch_size):
            ids = torch.tensor(blocks[start:start + batch_size], dtype=torch.long, device=device)
            logits = model(input_ids=ids).logits[:, :-1].float()
            targets = ids[:, 1:]
            nll = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1), reduction="sum")
            total_nll += nll.item()
            total_tokens += targets.numel()
    return math.exp(total_nll / total_tokens)


def heldout_perplexity(model, tokenizer, num_documents: int = data.HELDOUT_DOCUMENTS, batch_size: int = 32) -> float:
    """Perplexity on the demo's held-out corpus (the set ``training_report.json`` reports)."""
    return perplexity(model, data.heldout_blocks(tokenizer, num_documents), batch_size=batch_size)


@contextmanager
def _left_padding(tokenizer):
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # generation continues from the right end of every row
    try:
        yield
    finally:
        tokenizer.padding_side = side


def generate(model, tokenizer, prompts: Sequence[str], max_new_tokens: int = 32, batch_size: int = 64) -> list[str]:
    """Greedy continuations of ``prompts`` (the new text only, special tokens removed)."""
    device = _device(model)
    outputs: list[str] = []
    with _evaluating(model), _left_padding(tokenizer):
        for start in range(0, len(prompts), batch_size):
            batch = tokenizer(list(prompts[start:start + batch_size]), return_tensors="pt", padding=True).to(device)
            generated = model.generate(
                **batch,
                do_sample=False,
                max_new_tokens=max_new_tokens,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
            new_tokens = generated[:, batch["input_ids"].shape[1]:]
            outputs += tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
    return outputs


def _answer_length(tokenizer, records: Sequence[dict]) -> int:
    """Enough new tokens for the longest reference answer, plus its end-of-sequence token."""
    lengths = [len(tokenizer(" " + r["output"], add_special_tokens=False)["input_ids"]) for r in records]
    return max(lengths, default=8) + 1


def generate_answers(model, tokenizer, records: Sequence[dict], batch_size: int = 64,
                     max_new_tokens: int | None = None) -> list[str]:
    """The model's greedy answer to each instruction record: its first line, stripped."""
    prompts = [data.format_prompt(r) for r in records]
    max_new_tokens = max_new_tokens or _answer_length(tokenizer, records)
    texts = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size)
    return [text.strip().split("\n")[0].strip() for text in texts]


def exact_match(model, tokenizer, records: Sequence[dict], batch_size: int = 64,
                max_new_tokens: int | None = None) -> float:
    """Fraction of ``records`` whose greedy answer equals the reference ``output`` exactly."""
    if not records:
        raise ValueError("exact_match needs at least one record")
    answers = generate_answers(model, tokenizer, records, batch_size=batch_size, max_new_tokens=max_new_tokens)
    return sum(a == r["output"].strip() for a, r in zip(answers, records)) / len(records)


def exact_match_by_task(model, tokenizer, records: Sequence[dict], batch_size: int = 64) -> dict[str, float]:
    """Exact-match accuracy per ``task`` of the records, plus ``"all"``."""
    answers = generate_answers(model, tokenizer, records, batch_size=batch_size)
    hits: dict[str, list[bool]] = defaultdict(list)
    for answer, record in zip(answers, records):
        hit = answer == record["output"].strip()
        hits[record.get("task", "all")].append(hit)
        if record.get("task"):
            hits["all"].append(hit)
    return {task: sum(h) / len(h) for task, h in sorted(hits.items())}


def cloze_accuracy_by_task(model, tokenizer, records: Sequence[dict], batch_size: int = 64) -> dict[str, float]:
    """Accuracy per task (plus ``"all"``) on the records' cloze forms (``data.cloze_form``): the
    continuation must start with the answer as a whole word. Measures knowledge, not format."""
    pairs = [data.cloze_form(r) for r in records]
    texts = generate(model, tokenizer, [p for p, _ in pairs], max_new_tokens=_answer_length(tokenizer, records),
                     batch_size=batch_size)
    hits: dict[str, list[bool]] = defaultdict(list)
    for text, (_, answer), record in zip(texts, pairs, records):
        text = text.strip()
        hit = text.startswith(answer) and not text[len(answer):len(answer) + 1].isalnum()
        hits[record["task"]].append(hit)
        hits["all"].append(hit)
    return {task: sum(h) / len(h) for task, h in sorted(hits.items())}
