#!/usr/bin/env python
"""Train the demo's small pretrained Pre-LN base model and write it to lns_surgery/demo/base_model/.

    python scripts/train_demo_base.py --overwrite            # regenerate the shipped model
    python scripts/train_demo_base.py --out /tmp/demo-base   # the same run, somewhere else

What it does, deterministically (fixed seeds, the transformers Trainer with ``full_determinism``,
a fixed number of CPU threads):

1. generates the pre-training corpus, the held-out corpus and the instruction task
   (lns_surgery/demo/data.py: a procedural world of people, towns, numbers and letters);
2. trains a byte-level BPE tokenizer on the corpus and the instruction *training* texts (so that the
   instruction vocabulary is whole tokens; the model itself never sees instruction-format text);
3. trains a stock Pre-LN ``LlamaForCausalLM`` from scratch on the corpus alone with the Trainer on
   CPU (fp32);
4. measures held-out perplexity, exact-match accuracy on the instruction evaluation split and a few
   greedy samples, and writes the model, tokenizer, generation config and ``training_report.json``
   (a staging folder beside the output, renamed into place at the end).

Why this size: 8 layers, because the demo is about depth (LayerNorm Scaling divides block l's
sublayer inputs by sqrt(l), so the deep half gets 0.35-0.5x; with 2-4 layers there would be little
depth to study); hidden 64 (4 heads of 16, SwiGLU MLP of 192), because on a CPU budget of about
three minutes the narrow model learns more than a wider one: it runs twice as many steps. In the
design runs, at equal CPU time, hidden 64 / 1300 steps reached held-out perplexity 2.26 where
hidden 128 / 600 steps reached 2.62 (and answered 65% vs 40% of the evaluation questions in the
corpus's own phrasing), and learning rate 5e-3 beat 2e-3, 3e-3 and 8e-3. The shipped run: 2.32.
Its ~0.49M fp32 parameters take 2 MB.
One CPU thread by default: on a busy 2-core machine two threads ran up to 5x slower than one
(OpenMP threads wait on each other when another process holds a core); 1 and 2 threads gave
bitwise-identical weights here.

Why no instruction data in pre-training: the demo's fine-tuning stage must have something to teach;
the base model knows the facts and skills (from prose) but not the Instruction/Response format, so
its exact-match accuracy starts at zero and LoRA fine-tuning can move it within a CPU-minute. The
report's ``knowledge_probe`` asks the same evaluation questions in the corpus's phrasing
(``data.cloze_form``), which shows what the base model knows.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))  # run from a checkout without installing the package
from lns_surgery.demo import data  # noqa: E402  (light: no torch, no transformers)
DEFAULT_OUT = REPO_ROOT / "lns_surgery" / "demo" / "base_model"

# The settings of the shipped model; every one is recorded in training_report.json.
MODEL = dict(hidden_size=64, intermediate_size=192, num_hidden_layers=8, num_attention_heads=4,
             num_key_value_heads=4, max_position_embeddings=data.MAX_POSITIONS, rms_norm_eps=1e-6,
             initializer_range=0.02, tie_word_embeddings=True)
TRAIN = dict(num_documents=32000, max_steps=1300, batch_size=16, learning_rate=5e-3, warmup_steps=30,
             lr_scheduler_type="cosine", weight_decay=0.0, adam_beta2=0.95, max_grad_norm=1.0)
SEED = 42


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help="output folder (default: the package's base_model/)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    parser.add_argument("--max-steps", type=int, default=TRAIN["max_steps"],
                        help="optimizer steps (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=SEED, help="model init and data order seed (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads (default: %(default)s; more can be much slower on a busy machine)")
    return parser.parse_args(argv)


def prepare_data():
    """Steps 1-2: the tokenizer, the packed training blocks, the held-out blocks, the instruction splits."""
    corpus = data.pretraining_corpus(TRAIN["num_documents"], seed=data.TRAIN_CORPUS_SEED)
    splits = data.instruction_splits()
    instruction_texts = [data.format_prompt(r) + " " + r["output"] for r in splits["train"]]
    tokenizer = data.build_tokenizer(corpus + instruction_texts)
    return tokenizer, data.pack_documents(tokenizer, corpus), data.heldout_blocks(tokenizer), splits


def train(tokenizer, train_blocks, args, scratch: Path):
    """Step 3: a stock Pre-LN Llama trained from scratch with the Trainer; returns (model, trainer, result)."""
    import transformers
    from datasets import Dataset
    from transformers import DataCollatorForLanguageModeling, LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

    transformers.set_seed(args.seed, deterministic=True)  # the model's initial weights
    config = LlamaConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **MODEL)
    model = LlamaForCausalLM(config)
    training_args = TrainingArguments(
        output_dir=str(scratch),
        max_steps=args.max_steps,
        per_device_train_batch_size=TRAIN["batch_size"],
        learning_rate=TRAIN["learning_rate"],
        warmup_steps=TRAIN["warmup_steps"],
        lr_scheduler_type=TRAIN["lr_scheduler_type"],
        weight_decay=TRAIN["weight_decay"],
        adam_beta2=TRAIN["adam_beta2"],
        max_grad_norm=TRAIN["max_grad_norm"],
        logging_steps=100,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        bf16=False,
        seed=args.seed,
        data_seed=args.seed,
        full_determinism=True,
        dataloader_num_workers=0,
    )
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=Dataset.from_dict({"input_ids": train_blocks}),
        data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
    )
    result = trainer.train()
    return model, trainer, result


def measure(model, tokenizer, heldout, splits) -> dict:
    """Step 4: held-out perplexity, instruction exact match, the knowledge probe, greedy samples."""
    from lns_surgery.demo import evaluation

    prompts = data.sample_prompts()
    return {
        "heldout_perplexity": evaluation.perplexity(model, heldout),
        "instruction_exact_match": evaluation.exact_match_by_task(model, tokenizer, splits["eval"]),
        "knowledge_probe": evaluation.cloze_accuracy_by_task(model, tokenizer, splits["eval"]),
        "greedy_samples": dict(zip(prompts, evaluation.generate(model, tokenizer, prompts, max_new_tokens=24))),
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    out = args.out.resolve()
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        print(f"error: {out} exists and is not empty; pass --overwrite to replace it", file=sys.stderr)
        return 2
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    import tokenizers
    import torch
    import transformers
    from transformers import GenerationConfig

    torch.set_num_threads(args.threads)
    started = time.time()
    tokenizer, train_blocks, heldout, splits = prepare_data()
    data_seconds = time.time() - started
    print(f"corpus: {len(train_blocks)} blocks of {data.BLOCK_SIZE} tokens, vocabulary {len(tokenizer)}, "
          f"held-out {len(heldout)} blocks ({data_seconds:.0f} s)", flush=True)

    staging = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        model, trainer, result = train(tokenizer, train_blocks, args, staging / "trainer")
        train_seconds = time.time() - started - data_seconds
        measured = measure(model, tokenizer, heldout, splits)
        print(f"held-out perplexity {measured['heldout_perplexity']:.4f}; instruction exact match "
              f"(no fine-tuning) {measured['instruction_exact_match']['all']:.3f}; the same questions "
              f"in the corpus's phrasing {measured['knowledge_probe']['all']:.3f}")
        for prompt, continuation in measured["greedy_samples"].items():
            print(f"  {prompt!r} -> {continuation!r}")

        shutil.rmtree(staging / "trainer")
        model.generation_config = GenerationConfig(
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id, do_sample=False, max_new_tokens=32)
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        report = {
            **measured,
            "heldout": {"documents": data.HELDOUT_DOCUMENTS, "seed": data.HELDOUT_CORPUS_SEED,
                        "blocks": len(heldout), "block_size": data.BLOCK_SIZE},
            "instruction_eval_records": len(splits["eval"]),
            "final_train_loss": [e["loss"] for e in trainer.state.log_history if "loss" in e][-1],
            "mean_train_loss": result.training_loss,
            "parameters": sum(p.numel() for p in model.parameters()),
            "train_tokens": args.max_steps * TRAIN["batch_size"] * data.BLOCK_SIZE,
            "model": MODEL,
            "training": {**TRAIN, "max_steps": args.max_steps, "block_size": data.BLOCK_SIZE,
                         "vocab_size": len(tokenizer), "optimizer": trainer.args.optim.value,
                         "full_determinism": True, "threads": args.threads, "dtype": "float32"},
            "seeds": {"training": args.seed, "world": data.WORLD_SEED, "train_corpus": data.TRAIN_CORPUS_SEED,
                      "heldout_corpus": data.HELDOUT_CORPUS_SEED, "instructions": data.INSTRUCTION_SEED},
            "versions": {"python": platform.python_version(), "torch": torch.__version__,
                         "transformers": transformers.__version__, "tokenizers": tokenizers.__version__},
            "command": (f"python scripts/train_demo_base.py --max-steps {args.max_steps} --seed {args.seed} "
                        f"--threads {args.threads}"),
            "seconds": {"data_and_tokenizer": round(data_seconds, 1), "training": round(train_seconds, 1),
                        "total": round(time.time() - started, 1)},
        }
        (staging / "training_report.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        if out.exists():
            shutil.rmtree(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        os.rename(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # left only when something failed
    print(f"wrote {out} ({report['seconds']['total']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
