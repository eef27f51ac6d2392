"""Training-speed benchmark, measured side by side in one run on the same model and batches:

1. LNS overhead: optimizer-step time of the LNS model / the same model without LNS (target <= 1.02).
   LNS multiplies each scaled norm's weight vector by a float, so it should cost nothing measurable.
2. Padding-free packing vs padding: real (non-pad) tokens per second on Alpaca-like lengths, with
   TRL's own collator and best-fit-decreasing packing, as SFT runs use them.
3. Distillation healing, LoRA and full fine-tuning: the distillation step / (the plain step + the
   source model's forward alone), same LNS model and batch (target <= 1.10): what the loss costs beyond
   the teacher's forward; also / the plain step, and with the loss on half of each row, as in
   assistant-only SFT. Then the distillation step's peak memory at two sequence lengths, with the
   chunked loss at two chunk sizes and with the loss from whole logits: the first grows with the
   chunk, the second with tokens x vocabulary.

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


def distillation_loss_fn(student, teacher, batch, settings):
    """The trainer's distillation loss on one process: the teacher's hidden states, then the student's
    forward computing ``weight * KL + (1 - weight) * LM`` over the vocabulary in chunks."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    target = teacher.target(student, inputs, settings)
    return student(**inputs, labels=batch["labels"], lns_distill=target).loss


def time_distillation_overhead(lns, batch, device, autocast_dtype, warmup, steps, base=None):
    """Median step times (``plain``, ``distill``, ``plain_replies``, ``distill_replies``) and the teacher's
    forward alone (``teacher``: whole logits, no gradients), interleaved on one LNS model. A distillation
    step needs at least a plain step plus the teacher's forward; the loss's own cost is what it takes beyond.
    LoRA (default): the teacher is the student with its adapter off. With ``base`` (the same weights without
    LNS), full fine-tuning, the teacher being that source model as its own model."""
    from peft import LoraConfig, get_peft_model

    from lns_surgery.training.distill import DistillationSettings, SourceTeacher, install_distillation_forward

    settings = DistillationSettings(temperature=1.0, weight=1.0)
    if base is None:
        student = get_peft_model(copy.deepcopy(lns), LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
        install_distillation_forward(student.get_base_model())
        teacher = SourceTeacher()
    else:
        student = copy.deepcopy(lns)
        install_distillation_forward(student)
        source = copy.deepcopy(base).eval().requires_grad_(False)
        install_distillation_forward(source)
        teacher = SourceTeacher(source)
    student.train()
    optimizer = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=1e-5)
    batch = {k: v.to(device) for k, v in batch.items()}
    # As assistant-only SFT: the first half of every row is prompt and carries no loss
    replies = {**batch, "labels": batch["labels"].clone()}
    replies["labels"][:, : replies["labels"].shape[1] // 2] = -100
    losses = {"plain": lambda: student(**batch).loss,
              "distill": lambda: distillation_loss_fn(student, teacher, batch, settings),
              "plain_replies": lambda: student(**replies).loss,
              "distill_replies": lambda: distillation_loss_fn(student, teacher, replies, settings)}
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
            teacher.logits(student, {k: v for k, v in batch.items() if k != "labels"})
        sync(device)
        if step >= warmup:
            times["teacher"].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def distillation_summary(medians, batch_shape) -> dict:
    floor = medians["plain"] + medians["teacher"]
    return {"batch_shape": list(batch_shape), "plain_step_s": medians["plain"], "distill_step_s": medians["distill"],
            "teacher_forward_s": medians["teacher"], "ratio_over_plain": medians["distill"] / medians["plain"],
            # the target: the distillation step against a plain step plus the teacher's forward
            "ratio_over_plain_plus_teacher": medians["distill"] / floor, "target": 1.10,
            "replies_plain_step_s": medians["plain_replies"], "replies_distill_step_s": medians["distill_replies"],
            "replies_ratio_over_plain": medians["distill_replies"] / medians["plain_replies"]}


class PeakMemory:
    """Peak memory of a block above what was in use when it began: CUDA's allocator statistics on a GPU;
    on CPU the process's peak resident set (VmHWM), which Linux resets through /proc/self/clear_refs.
    glibc serves allocations below a threshold that grows to 32 MiB from memory it keeps after frees, which
    the resident set would not show, so on CPU every allocation over 64 KiB is made to map its own pages
    (for the rest of the process: measure last)."""

    def __init__(self, device):
        self.device = device
        if device.type != "cuda":
            import ctypes

            m_mmap_threshold = -3  # glibc's mallopt parameter; a fixed value also stops its growth
            ctypes.CDLL("libc.so.6").mallopt(m_mmap_threshold, 1 << 16)

    @staticmethod
    def _status_kib(field):
        with open("/proc/self/status", encoding="ascii") as status:
            return next(int(line.split()[1]) for line in status if line.startswith(field + ":"))

    def __enter__(self):
        import gc

        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()
        else:
            with open("/proc/self/clear_refs", "w", encoding="ascii") as clear:
                clear.write("5")  # the peak resident set starts again from the current one
            self.start = self._status_kib("VmRSS") * 1024
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self.start
        else:
            self.peak = self._status_kib("VmHWM") * 1024 - self.start


def distillation_memory(config, device, dtype, seq_lengths, chunk_sizes):
    """Peak memory of one distillation step (forward and backward of a full fine-tuning student, the
    teacher's forward) at each sequence length: with the chunked loss at each chunk size, and with the
    loss from whole logits (student and teacher logits materialised, the previous implementation)."""
    import gc

    from transformers import AutoModelForCausalLM

    from lns_surgery import apply_layernorm_scaling
    from lns_surgery.training.distill import (
        DistillationSettings,
        SourceTeacher,
        distillation_loss,
        install_distillation_forward,
    )

    torch.manual_seed(0)
    source = AutoModelForCausalLM.from_config(config, dtype=dtype).to(device).eval().requires_grad_(False)
    student = apply_layernorm_scaling(copy.deepcopy(source).requires_grad_(True)).train()
    install_distillation_forward(source)
    install_distillation_forward(student)
    teacher = SourceTeacher(source)

    def whole_logits(batch):
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        logits = student(**inputs).logits
        with torch.no_grad():
            teacher_logits = source(**inputs).logits
        kl = distillation_loss(logits, teacher_logits, batch["labels"])
        lm = student.loss_function(logits=logits, labels=batch["labels"], vocab_size=logits.shape[-1])
        return kl + 0.0 * lm  # the LM loss was computed beside the KL, for the logs

    results = []
    g = torch.Generator().manual_seed(2)
    for seq in seq_lengths:
        ids = torch.randint(3, config.vocab_size, (1, seq), generator=g).to(device)
        batch = {"input_ids": ids, "labels": ids.clone()}
        runs = {f"chunked_{c}": (lambda b, c=c: distillation_loss_fn(student, teacher, b, DistillationSettings(
            chunk_size=c))) for c in chunk_sizes}
        runs["whole_logits"] = whole_logits
        entry = {"tokens": seq, "one_fp32_logits_copy_bytes": seq * config.vocab_size * 4}
        for name, loss_fn in runs.items():
            loss_fn(batch).backward()  # warm-up: first-call allocations are not the loss's
            student.zero_grad(set_to_none=True)
            with PeakMemory(device) as peak:
                loss_fn(batch).backward()
            student.zero_grad(set_to_none=True)
            gc.collect()
            entry[f"{name}_peak_bytes"] = peak.peak
        results.append(entry)
    return {"vocab_size": config.vocab_size, "hidden_size": config.hidden_size, "dtype": str(dtype),
            "chunk_sizes": list(chunk_sizes), "per_sequence_length": results}


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

    # 3. distillation healing, LoRA and full fine-tuning: against a plain step plus the teacher's forward
    results["distillation_overhead"] = {
        mode: distillation_summary(time_distillation_overhead(lns, batch, device, autocast_dtype, warmup, steps,
                                                              base=base if mode == "full" else None), ids.shape)
        for mode in ("lora", "full")}
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

    # 3b. distillation's peak memory at two sequence lengths: the chunked loss grows with the chunk, the loss from
    # whole logits with tokens x vocabulary (a large vocabulary on a small model, so that the logits dominate).
    # Last: on CPU it changes how this process allocates.
    from transformers import LlamaConfig

    memory_config = config if options.gpu else LlamaConfig(
        vocab_size=32000, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=8192, tie_word_embeddings=True)
    seq_lengths, chunk_sizes = ((4096, 16384), (1024, 4096)) if options.gpu else ((1024, 4096), (256, 1024))
    results["distillation_memory"] = distillation_memory(memory_config, device, dtype, seq_lengths, chunk_sizes)

    Path(options.json).write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    overhead = results["lns_overhead"]
    print(f"{results['mode']} {results['device']} | {results['model']['model_type']} "
          f"{results['model']['parameters'] / 1e6:.1f}M params | {dtype} | {attn}")
    print(f"step time  base {overhead['base_step_s'] * 1e3:8.1f} ms   LNS {overhead['lns_step_s'] * 1e3:8.1f} ms   "
          f"LNS/base {overhead['ratio']:.3f} (target <= 1.02)")
    for mode, distill in results["distillation_overhead"].items():
        print(f"distillation ({mode}): plain step {distill['plain_step_s'] * 1e3:7.1f} ms   teacher forward "
              f"{distill['teacher_forward_s'] * 1e3:7.1f} ms   distillation step {distill['distill_step_s'] * 1e3:7.1f} ms")
        print(f"           distillation / (plain + teacher forward) {distill['ratio_over_plain_plus_teacher']:.3f} "
              f"(target <= {distill['target']})   distillation / plain {distill['ratio_over_plain']:.3f}   "
              f"loss on half the positions: / plain {distill['replies_ratio_over_plain']:.3f}")
    memory = results["distillation_memory"]
    print(f"distillation peak memory (vocabulary {memory['vocab_size']}, hidden {memory['hidden_size']}), MiB:")
    for entry in memory["per_sequence_length"]:
        chunked = "   ".join(f"chunk {c}: {entry[f'chunked_{c}_peak_bytes'] / 2**20:7.1f}" for c in memory["chunk_sizes"])
        print(f"  {entry['tokens']:6d} tokens  {chunked}   whole logits: {entry['whole_logits_peak_bytes'] / 2**20:7.1f}"
              f"   (one fp32 copy of the logits: {entry['one_fp32_logits_copy_bytes'] / 2**20:.1f})")
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
