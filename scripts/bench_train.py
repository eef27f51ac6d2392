"""Training-speed benchmark, measured side by side in one run on the same model and batches:

1. LNS overhead: optimizer-step time of the LNS model / the same model without LNS (target <= 1.02).
   LNS multiplies each scaled norm's weight vector by a float, so it should cost nothing measurable.
2. Padding-free packing vs padding: real (non-pad) tokens per second on Alpaca-like lengths, with
   TRL's own collator and best-fit-decreasing packing, as SFT runs use them.
3. Distillation healing: LoRA step time with the distillation loss (the student's forward and
   backward plus the source model's forward without gradients, the adapter disabled) / the plain
   LoRA step, same LNS model and batch (target <= 1.3); and the same with the loss on half of each
   row, as in assistant-only SFT, where only the positions that carry the loss enter the KL.

CPU (default): a small Llama (1.4M parameters), fp32, one thread; under a minute.
GPU (--gpu): bf16, Qwen2.5-0.5B shapes with random weights, sdpa (flash-attention 2 when installed);
also reports MFU against the GPU's dense bf16 peak. Sized to finish in under 5 minutes on one H200.

    python scripts/bench_train.py [--gpu] [--json bench_train.json]

Writes every figure to the JSON file and prints a summary table.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import statistics
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("LNS_SHARED_DIR", REPO.parent / "shared"))

# Dense bf16 peak (TFLOP/s, no sparsity) of GPUs this is likely to run on, by name fragment.
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0, "L4": 121.0}


def model_config(gpu: bool):
    from transformers import LlamaConfig, Qwen2Config

    if gpu:  # Qwen2.5-0.5B
        return Qwen2Config(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                           num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
                           rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True)
    return LlamaConfig(vocab_size=2048, hidden_size=128, intermediate_size=344, num_hidden_layers=6,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                       tie_word_embeddings=True)


def build_models(config, device, dtype, attn):
    """(base, lns): the same random weights, the second with LayerNorm Scaling applied."""
    from transformers import AutoModelForCausalLM

    from lns_surgery import apply_layernorm_scaling

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(config, attn_implementation=attn, dtype=dtype).to(device)
    lns = apply_layernorm_scaling(copy.deepcopy(base))
    return base.train(), lns.train()


def alpaca_lengths(count: int, tokens_per_word: float, seed: int = 0) -> list[int]:
    """Token counts of Alpaca records (prompt + response): from ../shared's 1k sample when present,
    else a log-normal fit of Alpaca's lengths (median ~130 tokens, long tail)."""
    import random

    rng = random.Random(seed)
    sample = SHARED / "data" / "alpaca" / "alpaca_sample1k.json"
    if sample.is_file():
        records = json.loads(sample.read_text(encoding="utf-8"))
        # words of the standard prompt + fields, at this tokenizer's rate
        words = [45 + len((r["instruction"] + " " + r.get("input", "") + " " + r["output"]).split()) for r in records]
        lengths = [max(8, int(w * tokens_per_word)) for w in words]
        source = str(sample)
    else:
        lengths = [max(8, int(rng.lognormvariate(math.log(130), 0.6))) for _ in range(count)]
        source = "log-normal(median 130)"
    rng.shuffle(lengths)
    while len(lengths) < count:
        lengths += lengths
    return lengths[:count], source


def make_batches(lengths, vocab, max_length, batch_size, packed: bool):
    """Batches from TRL's collator: padded (attention mask) or BFD-packed and padding-free (position_ids)."""
    from datasets import Dataset
    from trl.data_utils import pack_dataset
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    g = torch.Generator().manual_seed(0)
    rows = [{"input_ids": torch.randint(3, vocab, (min(n, max_length),), generator=g).tolist()} for n in lengths]
    dataset = Dataset.from_list(rows)
    if packed:
        dataset = pack_dataset(dataset, max_length, "bfd", {})
        # rows are already max_length long, so fewer of them go in a batch of the same token budget
        per_batch = max(1, batch_size * 128 // max_length) if max_length > 128 else batch_size
    else:
        per_batch = batch_size
    collator = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=packed)
    examples = list(dataset)
    batches = [collator(examples[i:i + per_batch]) for i in range(0, len(examples), per_batch)]
    real_tokens = sum(min(n, max_length) for n in lengths)
    return batches, real_tokens


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def train_step(model, optimizer, batch, device, autocast_dtype):
    batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
    with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        loss = model(**batch).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def time_lns_overhead(base, lns, batch, device, autocast_dtype, warmup, steps):
    """Median step time of each model, the two interleaved so that machine noise hits both alike."""
    optimizers = {name: torch.optim.AdamW(m.parameters(), lr=1e-5) for name, m in (("base", base), ("lns", lns))}
    times = {"base": [], "lns": []}
    for step in range(warmup + steps):
        for name, model in (("base", base), ("lns", lns)) if step % 2 == 0 else (("lns", lns), ("base", base)):
            sync(device)
            start = time.perf_counter()
            train_step(model, optimizers[name], batch, device, autocast_dtype)
            sync(device)
            if step >= warmup:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def time_distillation_overhead(lns, batch, device, autocast_dtype, warmup, steps):
    """Median LoRA step time with the distillation loss / without it, interleaved, on one LNS model."""
    from collections import defaultdict
    from types import SimpleNamespace

    from peft import LoraConfig, get_peft_model

    from lns_surgery.training.distill import SourceTeacher, distilling_compute_loss

    student = get_peft_model(copy.deepcopy(lns), LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    student.train()
    # The trainer state distilling_compute_loss reads, on one process.
    trainer = SimpleNamespace(distillation={"temperature": 1.0, "weight": 1.0}, teacher=SourceTeacher(),
                              args=SimpleNamespace(average_tokens_across_devices=False),
                              accelerator=SimpleNamespace(num_processes=1, gather_for_metrics=lambda value: value),
                              _metrics={"train": defaultdict(list), "eval": defaultdict(list)})
    optimizer = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=1e-5)
    batch = {k: v.to(device) for k, v in batch.items()}
    # As assistant-only SFT: the first half of every row is prompt and carries no loss
    replies = {**batch, "labels": batch["labels"].clone()}
    replies["labels"][:, : replies["labels"].shape[1] // 2] = -100
    losses = {"plain": lambda: student(**batch).loss, "distill": lambda: distilling_compute_loss(trainer, student, batch),
              "plain_replies": lambda: student(**replies).loss,
              "distill_replies": lambda: distilling_compute_loss(trainer, student, replies)}
    times = {name: [] for name in (*losses, "teacher")}
    for step in range(warmup + steps):
        for name in losses if step % 2 == 0 else reversed(losses):
            sync(device)
            start = time.perf_counter()
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                loss = losses[name]()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            sync(device)
            if step >= warmup:
                times[name].append(time.perf_counter() - start)
        # the teacher's forward alone: the part of the overhead no loss implementation can remove
        sync(device)
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            trainer.teacher.logits(student, {k: v for k, v in batch.items() if k != "labels"})
        sync(device)
        if step >= warmup:
            times["teacher"].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def time_throughput(model, batches, real_tokens, device, autocast_dtype, warmup):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    for batch in batches[:warmup]:
        train_step(model, optimizer, batch, device, autocast_dtype)
    sync(device)
    start = time.perf_counter()
    for batch in batches:
        train_step(model, optimizer, batch, device, autocast_dtype)
    sync(device)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "real_tokens": real_tokens, "tokens_per_second": real_tokens / seconds,
            "batches": len(batches), "tokens_in_batches": int(sum(b["input_ids"].numel() for b in batches))}


def flops_per_token(config, context: float) -> float:
    """Training FLOPs per token: 6 x (parameters used in matmuls, LM head included) + attention's
    12 x layers x hidden x context (forward + backward of QK^T and AV)."""
    d, f, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    head_dim = d // config.num_attention_heads
    kv = config.num_key_value_heads * head_dim
    per_layer = d * d + 2 * d * kv + d * d + 3 * d * f  # q, k, v, o, gate/up/down
    matmul_params = layers * per_layer + d * config.vocab_size  # + LM head
    return 6 * matmul_params + 12 * layers * d * context


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpu", action="store_true", help="bf16 on CUDA, Qwen2.5-0.5B shapes, MFU")
    parser.add_argument("--json", default="bench_train.json", help="where to write the figures")
    parser.add_argument("--records", type=int, default=None, help="Alpaca-like records for the throughput part")
    options = parser.parse_args()

    if options.gpu:
        if not torch.cuda.is_available():
            raise SystemExit("--gpu needs a CUDA GPU")
        device, dtype, autocast_dtype = torch.device("cuda"), torch.bfloat16, None
        import importlib.util

        attn = "flash_attention_2" if importlib.util.find_spec("flash_attn") else "sdpa"
        # 32 padded records per batch; packing gives each batch the same token budget (2 rows of 2048)
        max_length, batch_size, warmup, steps = 2048, 32, 3, 10
        records = options.records or 4000
        torch.backends.cuda.matmul.allow_tf32 = True
    else:
        device, dtype, autocast_dtype, attn = torch.device("cpu"), torch.float32, None, "sdpa"
        max_length, batch_size, warmup, steps = 256, 8, 3, 15
        records = options.records or 64
        torch.set_num_threads(1)  # steadier timings on a shared machine; both sides get the same

    config = model_config(options.gpu)
    base, lns = build_models(config, device, dtype, attn)
    results = {"mode": "gpu" if options.gpu else "cpu", "device": torch.cuda.get_device_name() if options.gpu
               else platform.processor() or platform.machine(), "torch": torch.__version__, "dtype": str(dtype),
               "attn_implementation": attn, "model": {k: getattr(config, k) for k in (
                   "model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                   "num_key_value_heads", "vocab_size")}}
    results["model"]["parameters"] = sum(p.numel() for p in base.parameters())

    # 1. LNS / base step time on one fixed batch (padded, every row full: no padding effects)
    g = torch.Generator().manual_seed(1)
    # 8 x 2048 on the GPU: the fp32 logits of a 152K vocabulary dominate memory beyond that
    ids = torch.randint(3, config.vocab_size, (8 if options.gpu else 4, max_length), generator=g)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    medians = time_lns_overhead(base, lns, batch, device, autocast_dtype, warmup, steps)
    results["lns_overhead"] = {"batch_shape": list(ids.shape), "base_step_s": medians["base"],
                               "lns_step_s": medians["lns"], "ratio": medians["lns"] / medians["base"],
                               "target": 1.02, "steps_timed": steps}

    # 3. distillation healing with LoRA: teacher forward without gradients on the same model
    distill = time_distillation_overhead(lns, batch, device, autocast_dtype, warmup, steps)
    results["distillation_overhead"] = {"batch_shape": list(ids.shape), "lora_step_s": distill["plain"],
                                        "distill_step_s": distill["distill"], "teacher_forward_s": distill["teacher"],
                                        "ratio": distill["distill"] / distill["plain"], "target": 1.3,
                                        # plain step + the teacher's forward, before any loss: the floor of the ratio
                                        "teacher_floor_ratio": (distill["plain"] + distill["teacher"]) / distill["plain"],
                                        # the same with half of every row's positions carrying the loss
                                        "replies_lora_step_s": distill["plain_replies"],
                                        "replies_distill_step_s": distill["distill_replies"],
                                        "replies_ratio": distill["distill_replies"] / distill["plain_replies"]}

    # 2. padding-free packing vs padding, same records, LNS model (a fresh copy for each)
    tokens_per_word = 1.35  # Qwen/Llama BPE on English
    lengths, source = alpaca_lengths(records, tokens_per_word)
    del base
    throughput = {}
    for mode, packed in (("padding", False), ("packing", True)):
        batches, real = make_batches(lengths, config.vocab_size, max_length, batch_size, packed)
        model = copy.deepcopy(lns)
        throughput[mode] = time_throughput(model, batches, real, device, autocast_dtype, warmup=min(2, len(batches)))
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    throughput["ratio_packing_over_padding"] = throughput["packing"]["tokens_per_second"] / throughput["padding"]["tokens_per_second"]
    throughput["lengths"] = {"source": source, "records": len(lengths), "mean": statistics.mean(lengths),
                             "median": statistics.median(lengths), "max_length": max_length}
    results["throughput"] = throughput

    if options.gpu:
        name = torch.cuda.get_device_name()
        peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
        mean_len = statistics.mean(min(n, max_length) for n in lengths)
        for mode in ("padding", "packing"):
            entry = throughput[mode]
            # padding computes on pad tokens too; MFU counts the useful (real) tokens only
            achieved = entry["tokens_per_second"] * flops_per_token(config, mean_len) / 1e12
            entry["model_tflops_per_s"] = achieved
            entry["mfu"] = achieved / peak if peak else None
        step_tokens = ids.numel()
        achieved = step_tokens / medians["lns"] * flops_per_token(config, max_length) / 1e12
        results["lns_overhead"]["lns_tflops_per_s"] = achieved
        results["lns_overhead"]["mfu"] = achieved / peak if peak else None
        results["peak_bf16_tflops"] = peak

    Path(options.json).write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    overhead = results["lns_overhead"]
    print(f"{results['mode']} {results['device']} | {results['model']['model_type']} "
          f"{results['model']['parameters'] / 1e6:.1f}M params | {dtype} | {attn}")
    print(f"step time  base {overhead['base_step_s'] * 1e3:8.1f} ms   LNS {overhead['lns_step_s'] * 1e3:8.1f} ms   "
          f"LNS/base {overhead['ratio']:.3f} (target <= 1.02)")
    distill = results["distillation_overhead"]
    print(f"LoRA step  plain {distill['lora_step_s'] * 1e3:7.1f} ms   distillation {distill['distill_step_s'] * 1e3:7.1f} ms"
          f"   ratio {distill['ratio']:.3f} (target <= 1.3)")
    print(f"           teacher forward alone {distill['teacher_forward_s'] * 1e3:7.1f} ms"
          f"   plain + teacher forward: ratio {distill['teacher_floor_ratio']:.3f} (the floor)")
    print(f"           loss on half the positions (assistant-only SFT): plain {distill['replies_lora_step_s'] * 1e3:7.1f} ms"
          f"   distillation {distill['replies_distill_step_s'] * 1e3:7.1f} ms   ratio {distill['replies_ratio']:.3f}")
    for mode in ("padding", "packing"):
        entry = throughput[mode]
        mfu = f"   MFU {entry['mfu']:.1%}" if entry.get("mfu") else ""
        print(f"{mode:<8} {entry['tokens_per_second']:10.0f} real tokens/s  ({entry['batches']} batches, "
              f"{entry['tokens_in_batches']} tokens computed for {entry['real_tokens']} real){mfu}")
    print(f"packing / padding: {throughput['ratio_packing_over_padding']:.2f}x   (lengths: {source}, "
          f"mean {throughput['lengths']['mean']:.0f}, median {throughput['lengths']['median']:.0f})")
    print(f"wrote {options.json}")


if __name__ == "__main__":
    main()
