"""How fast, and in how much memory, does conversion run compared with copying the checkpoint?

Builds a sharded random-weight checkpoint with real Llama shapes (TinyLlama-1.1B's widths, 12
layers, bf16: about 1.3 GB in 500 MB shards), then times, side by side and interleaved in one run:

- ``cp -r`` of the folder (the floor any conversion has to pay),
- ``lns-surgery convert --mode code`` and ``--mode fold`` (each as a fresh process, like a user runs it),
- the naive route: ``from_pretrained`` + ``apply_layernorm_scaling`` + ``save_pretrained``,

and the peak RSS of each process. The fixed start-up cost (Python, torch, transformers imports) is
left out by timing the conversion inside a process that has already converted a tiny checkpoint. Targets: code <= 1.2x
cp, fold <= 2x cp, peak memory above start-up <= largest shard + 100 MB.

    python scripts/bench_convert.py [--layers 12] [--repeats 3] [--workdir /tmp/lns-bench] [--out bench_results/convert.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

SHAPES = dict(hidden_size=2048, intermediate_size=5632, num_attention_heads=32, num_key_value_heads=4, vocab_size=32000)


def build_checkpoint(folder: Path, num_layers: int, shard_bytes: int = 500_000_000) -> dict:
    """Write a random bf16 Llama checkpoint shard by shard (never the whole model in memory)."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    config = LlamaConfig(num_hidden_layers=num_layers, tie_word_embeddings=False, dtype="bfloat16", **SHAPES)
    folder.mkdir(parents=True)
    config.save_pretrained(folder)
    h, i, kv = SHAPES["hidden_size"], SHAPES["intermediate_size"], SHAPES["hidden_size"] // SHAPES["num_attention_heads"] * SHAPES["num_key_value_heads"]
    shapes = {"model.embed_tokens.weight": (SHAPES["vocab_size"], h)}
    for layer in range(num_layers):
        p = f"model.layers.{layer}."
        shapes.update({
            p + "self_attn.q_proj.weight": (h, h), p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, h),
            p + "mlp.gate_proj.weight": (i, h), p + "mlp.up_proj.weight": (i, h), p + "mlp.down_proj.weight": (h, i),
            p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
        })
    shapes.update({"model.norm.weight": (h,), "lm_head.weight": (SHAPES["vocab_size"], h)})

    shards, current, size = [], {}, 0
    for name, shape in shapes.items():
        numel = 1
        for dim in shape:
            numel *= dim
        if current and size + 2 * numel > shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = shape
        size += 2 * numel
    shards.append(current)
    weight_map, total = {}, 0
    generator = torch.Generator().manual_seed(0)
    for index, shard in enumerate(shards):
        file = f"model-{index + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for name, shape in shard.items():
            if len(shape) == 1:
                tensors[name] = (1 + 0.1 * torch.randn(shape, generator=generator)).to(torch.bfloat16)
            else:
                tensors[name] = (0.02 * torch.randn(shape, generator=generator)).to(torch.bfloat16)
            weight_map[name] = file
            total += tensors[name].numel() * 2
        save_file(tensors, folder / file, metadata={"format": "pt"})
        del tensors
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    return {"total_bytes": total, "largest_shard_bytes": max((folder / f).stat().st_size for f in set(weight_map.values())),
            "shards": len(shards), "layers": num_layers}


def run(command: list[str]) -> dict:
    """Wall time and peak RSS (MB) of one child process.

    Linux carries a process's peak RSS across fork and exec, so this parent stays small (it never
    imports torch) to keep the children's figures their own.
    """
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - start
    if status != 0:
        raise RuntimeError(f"{command} failed: {process.stderr.read().decode()[-2000:]}")
    return {"seconds": wall, "peak_rss_mb": usage.ru_maxrss / 1024}


# Start-up (imports, registry, transformers' lazy modules) is paid once by converting the tiny
# checkpoint; then the big conversion is timed inside the same process, with the peak RSS before and after.
IN_PROCESS = """
import json, resource, shutil, sys, time
import lns_surgery
mode, tiny, big, out = sys.argv[1:5]
lns_surgery.convert(tiny, out, mode=mode, overwrite=True)
shutil.rmtree(out)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
start = time.perf_counter()
lns_surgery.convert(big, out, mode=mode)
seconds = time.perf_counter() - start
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"seconds": seconds, "rss_before_mb": before, "rss_after_mb": after}))
"""

NAIVE = """
import sys, torch, lns_surgery
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.bfloat16)
lns_surgery.apply_layernorm_scaling(model).save_pretrained(sys.argv[2])
"""


def routes(source: Path, target: Path) -> dict:
    cli = [sys.executable, "-m", "lns_surgery", "convert", str(source), "--out", str(target), "--overwrite"]
    return {
        "cp": ["cp", "-r", str(source), str(target)],
        "code": cli + ["--mode", "code"],
        "fold": cli + ["--mode", "fold"],
        "naive": [sys.executable, "-c", NAIVE, str(source), str(target)],
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/lns-bench-convert"))
    parser.add_argument("--out", type=Path, default=Path("bench_results/convert.json"))
    parser.add_argument("--keep", action="store_true", help="keep the generated checkpoint for the next run")
    parser.add_argument("--build", type=Path, help=argparse.SUPPRESS)  # internal: build in a child process
    parser.add_argument("--tiny", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.build:
        print(json.dumps(build_checkpoint(args.build, args.layers)))
        return
    if args.tiny:
        from transformers import LlamaConfig, LlamaForCausalLM

        LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                     num_key_value_heads=2, vocab_size=256)).save_pretrained(args.tiny)
        return

    # Every conversion plans from scratch (traces and proves the norms); scripts/bench_startup.py measures
    # that fixed start-up on its own.
    big, tiny = args.workdir / "big", args.workdir / "tiny"
    info_file = args.workdir / "info.json"
    if not (big / "model.safetensors.index.json").exists() or json.loads(info_file.read_text())["layers"] != args.layers:
        shutil.rmtree(args.workdir, ignore_errors=True)
        print(f"building a {args.layers}-layer random checkpoint in {big} ...", flush=True)
        built = subprocess.run([sys.executable, __file__, "--layers", str(args.layers), "--build", str(big)],
                               check=True, capture_output=True, text=True)
        info_file.write_text(built.stdout.strip().splitlines()[-1])
    info = json.loads(info_file.read_text())
    if not tiny.exists():
        subprocess.run([sys.executable, __file__, "--tiny", str(tiny)], check=True, capture_output=True)
    print(f"checkpoint: {info['total_bytes'] / 1e9:.2f} GB in {info['shards']} shards (largest {info['largest_shard_bytes'] / 1e6:.0f} MB)")

    samples = {name: [] for name in ("cp", "code", "fold", "naive")}
    inside = {name: [] for name in ("code", "fold")}
    subprocess.run(["cat", *map(str, big.glob("*.safetensors"))], stdout=subprocess.DEVNULL, check=True)  # warm the page cache
    for repeat in range(args.repeats):
        for name, command in routes(big, args.workdir / "out").items():
            shutil.rmtree(args.workdir / "out", ignore_errors=True)
            samples[name].append(run(command))
            print(f"  repeat {repeat + 1}: {name:5s} {samples[name][-1]['seconds']:6.2f} s, peak RSS {samples[name][-1]['peak_rss_mb']:7.0f} MB", flush=True)
        shutil.rmtree(args.workdir / "out", ignore_errors=True)
        for mode in inside:
            measured = subprocess.run([sys.executable, "-c", IN_PROCESS, mode, str(tiny), str(big), str(args.workdir / "out")],
                                      check=True, capture_output=True, text=True)
            inside[mode].append(json.loads(measured.stdout.strip().splitlines()[-1]))
            shutil.rmtree(args.workdir / "out", ignore_errors=True)
            print(f"  repeat {repeat + 1}: {mode:5s} {inside[mode][-1]['seconds']:6.2f} s after start-up, in process", flush=True)

    def median(values, key):
        return statistics.median(value[key] for value in values)

    cp = median(samples["cp"], "seconds")
    result = {"checkpoint": info, "repeats": args.repeats, "cp_seconds": cp, "cli_seconds": {}, "work_seconds": {},
              "ratios_to_cp": {}, "peak_rss_mb": {}, "peak_rss_above_startup_mb": {}}
    for name in samples:
        result["cli_seconds"][name] = median(samples[name], "seconds")
        result["peak_rss_mb"][name] = median(samples[name], "peak_rss_mb")
    for mode in inside:
        work = median(inside[mode], "seconds")
        result["work_seconds"][mode] = work
        result["ratios_to_cp"][mode] = work / cp
        result["peak_rss_above_startup_mb"][mode] = max(m["rss_after_mb"] - m["rss_before_mb"] for m in inside[mode])
    result["ratios_to_cp"]["naive"] = result["cli_seconds"]["naive"] / cp
    budget_mb = info["largest_shard_bytes"] / 2**20 + 100
    result["targets"] = {
        "code_vs_cp_max": 1.2, "fold_vs_cp_max": 2.0, "memory_above_startup_max_mb": budget_mb,
        "code_ok": result["ratios_to_cp"]["code"] <= 1.2, "fold_ok": result["ratios_to_cp"]["fold"] <= 2.0,
        "memory_ok": max(result["peak_rss_above_startup_mb"].values()) <= budget_mb,
    }
    print("\nmedian of", args.repeats, "interleaved runs")
    print(f"  cp -r:        {cp:6.2f} s")
    for mode in inside:
        print(f"  {mode} mode:    {result['work_seconds'][mode]:6.2f} s after start-up -> {result['ratios_to_cp'][mode]:.2f}x cp "
              f"(whole CLI run {result['cli_seconds'][mode]:.2f} s); peak RSS {result['peak_rss_above_startup_mb'][mode]:.0f} MB "
              f"above start-up (budget {budget_mb:.0f} MB)")
    print(f"  naive route:  {result['cli_seconds']['naive']:6.2f} s (whole run) -> {result['ratios_to_cp']['naive']:.2f}x cp; "
          f"peak RSS {result['peak_rss_mb']['naive']:.0f} MB")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")
    if not args.keep:
        shutil.rmtree(args.workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
