"""What does the layer-removal sweep of ``lns-surgery analyze`` cost, next to plain evaluation and
next to the naive route?

Builds a random-weight Llama (8 blocks of width 512, about 28M parameters, fp32) and evaluation
windows (TinyShakespeare through the stories260K tokenizer from ../shared, or random token ids
when ../shared is absent: the timings do not depend on the text), then times, in one run:

- (L+1) plain evaluation passes over the windows: what "one pass per skipped block plus one" costs;
- the analysis sweep (``depth_measures``): variance, sublayer norms, angular distances and the
  removal of every block, bypassed in one process;
- the naive route: for each block, copy the model, delete the block, ``save_pretrained``, load it
  back with ``lns_surgery.load_model`` and evaluate; plus one evaluation of the whole model.

It checks that the naive route's losses equal the sweep's, and reports sweep / (L+1 plain passes)
(target <= 1.2) and naive / sweep. Plain passes and sweep are repeated and the fastest of each
kept (the machine may be shared).

    python scripts/bench_analyze.py [--layers 8] [--hidden 512] [--windows 4] [--seq-len 256] [--repeats 2] [--out bench_results/analyze.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

SHARED = Path(os.environ.get("LNS_SHARED_DIR", Path(__file__).resolve().parent.parent.parent / "shared"))


def build_model(layers: int, hidden: int, vocab: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 11 // 4,
                         num_hidden_layers=layers, num_attention_heads=hidden // 64, num_key_value_heads=hidden // 128,
                         max_position_embeddings=1024, bos_token_id=1, eos_token_id=2, tie_word_embeddings=True)
    return LlamaForCausalLM(config).eval()


def build_windows(count: int, seq_len: int):
    """(windows, where they came from): real text when ../shared is here, random ids otherwise."""
    tokenizer_dir = SHARED / "models" / "stories260K"
    text = SHARED / "data" / "tinyshakespeare" / "input.txt"
    if tokenizer_dir.is_dir() and text.is_file():
        from lns_surgery import load_tokenizer
        from lns_surgery.analysis import token_windows

        windows = token_windows(load_tokenizer(str(tokenizer_dir)), text, seq_len, count * seq_len)
        return windows, f"{text} (stories260K tokenizer)"
    generator = torch.Generator().manual_seed(0)
    return torch.randint(3, 512, (count, seq_len), generator=generator), "random token ids (../shared not found)"


def delete_block(model, index: int):
    """The naive construction: a copy of the model with block ``index`` removed from its list."""
    smaller = copy.deepcopy(model)
    del smaller.model.layers[index]
    smaller.config.num_hidden_layers -= 1
    if isinstance(getattr(smaller.config, "layer_types", None), list):
        smaller.config.layer_types = [kind for i, kind in enumerate(smaller.config.layer_types) if i != index]
    for position, block in enumerate(smaller.model.layers):  # keep the KV-cache slots consistent
        block.self_attn.layer_idx = position
    return smaller


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--windows", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", default="bench_results/analyze.json")
    args = parser.parse_args()

    from transformers.utils import logging as hf_logging

    from lns_surgery import load_model
    from lns_surgery.analysis import depth_measures, evaluate_nll

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    windows, data = build_windows(args.windows, args.seq_len)
    model = build_model(args.layers, args.hidden, vocab=512)
    count = args.layers
    parameters = sum(p.numel() for p in model.parameters())
    evaluate_nll(model, windows[:1], 1)  # warm-up: first-call allocations are nobody's cost

    plain_times, sweep_times = [], []
    for _ in range(args.repeats):  # interleaved, so that a busy moment hurts both
        start = time.perf_counter()
        for _ in range(count + 1):
            evaluate_nll(model, windows, args.batch_size)
        plain_times.append(time.perf_counter() - start)
        start = time.perf_counter()
        measured = depth_measures(model, windows, batch_size=args.batch_size)
        sweep_times.append(time.perf_counter() - start)
    plain, sweep = min(plain_times), min(sweep_times)

    naive_losses = []
    with tempfile.TemporaryDirectory() as workdir:
        start = time.perf_counter()
        nll, tokens = evaluate_nll(model, windows, args.batch_size)
        for index in range(count):
            folder = Path(workdir) / f"without-{index}"
            delete_block(model, index).save_pretrained(folder)
            reloaded = load_model(str(folder)).eval()
            nll, tokens = evaluate_nll(reloaded, windows, args.batch_size)
            naive_losses.append(nll / tokens)
            del reloaded
        naive = time.perf_counter() - start
    largest_difference = max(abs(a - b) for a, b in zip(naive_losses, measured["removal_loss"]))

    result = {
        "model": f"random Llama, {count} blocks, hidden {args.hidden}, {parameters / 1e6:.1f}M parameters, fp32",
        "data": data,
        "windows": args.windows,
        "seq_len": args.seq_len,
        "batch_size": args.batch_size,
        "torch_threads": torch.get_num_threads(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "seconds": {
            "plain_passes_L_plus_1": round(plain, 3),
            "one_plain_pass": round(plain / (count + 1), 3),
            "analysis_sweep": round(sweep, 3),
            "naive_delete_save_reload": round(naive, 3),
            "plain_repeats": [round(t, 3) for t in plain_times],
            "sweep_repeats": [round(t, 3) for t in sweep_times],
        },
        "sweep_over_L_plus_1_plain_passes": round(sweep / plain, 3),
        "target_sweep_over_plain": 1.2,
        "naive_over_sweep": round(naive / sweep, 2),
        "largest_removal_loss_difference_naive_vs_sweep": largest_difference,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{result['model']}; {args.windows} windows x {args.seq_len} tokens of {data}")
    print(f"  {count + 1} plain evaluation passes : {plain:8.2f} s")
    print(f"  analysis sweep (all measures): {sweep:8.2f} s   -> {sweep / plain:.2f}x the plain passes (target <= 1.2)")
    print(f"  naive delete/save/reload     : {naive:8.2f} s   -> {naive / sweep:.1f}x the sweep")
    print(f"  removal losses, naive vs sweep: largest difference {largest_difference:.2e}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
