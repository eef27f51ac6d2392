"""The stages of scripts/gpu_check.sh, one subcommand each; gpu_check.sh runs them under its time limits.

    python3 scripts/gpu_check_stages.py STAGE OUT_DIR [WORK_DIR]

Each stage writes OUT_DIR/<stage>.json ({"figures": the key figures, "problems": [...], "details": ...}),
rewritten as it goes so that a stage stopped by its time limit still leaves what it measured, and exits 1
when it found a problem. GPU_CHECK_DRY=1 runs every stage on the CPU with tiny models and a few steps
(what tests/test_gpu_check.py runs). The models have random weights with the shapes of real checkpoints;
data and tokenizers are generated here, so nothing is downloaded.

Helpers for gpu_check.sh: ``wheels FOLDER`` (the wheels whose package is not installed), ``setup OUT_DIR``
(the imports, with one line naming the preparation step when one fails), ``summary OUT_DIR STAGE STATUS
SECONDS LIMIT TOTAL`` (summary.json after each stage), ``finish OUT_DIR STATUS TOTAL`` and ``report OUT_DIR``
(the key figures, printed).
Only the stages import torch.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DRY = os.environ.get("GPU_CHECK_DRY") == "1"
SKIPPED = 77  # a stage's exit status for "cannot run here"
# The imports the stages need; on the GPU machine trl and datasets (with dill, multiprocess) come from .whl/.
REQUIRED = ("torch", "transformers", "accelerate", "peft", "trl", "datasets", "safetensors", "tokenizers",
            "yaml", "click")
PREPARE = "scripts/prepare_gpu_wheels.py"


# --- the small helpers --------------------------------------------------------------------------


def write_json(path: Path, data) -> None:
    """Replace ``path`` in one step: a reader (or a kill) never meets half a file."""
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    os.replace(temporary, path)


def read_json(path: Path, default=None):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return default


def cmd_wheels(folder: str) -> int:
    """Print the wheels in ``folder`` whose distribution this interpreter does not have: the image's own
    packages stay the only version of each."""
    import importlib.metadata
    import re

    for wheel in sorted(Path(folder).glob("*.whl")):
        name = re.sub(r"[-_.]+", "-", wheel.name.split("-")[0]).lower()
        try:
            importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            print(wheel)
    return 0


def _unsatisfied(names) -> list[str]:
    """Requirements of ``names`` (and of what they need, one level) that the installed versions miss."""
    import importlib.metadata

    from packaging.requirements import Requirement

    found = []
    for name in names:
        try:
            requires = importlib.metadata.distribution(name).requires or []
        except importlib.metadata.PackageNotFoundError:
            continue
        for line in requires:
            requirement = Requirement(line)
            if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
                continue
            try:
                have = importlib.metadata.version(requirement.name)
            except importlib.metadata.PackageNotFoundError:
                found.append(f"{name} needs {requirement}: not installed")
                continue
            if not requirement.specifier.contains(have, prereleases=True):
                found.append(f"{name} needs {requirement}: {have} installed")
    return found


def cmd_setup(out: str) -> int:
    """The imports every stage needs, the versions, and (outside dry mode) a usable GPU."""
    import importlib
    import importlib.metadata
    import platform

    missing = []
    for module in (*REQUIRED, "lns_surgery"):
        try:
            importlib.import_module(module)
        except Exception as exc:  # an ImportError, or a package that breaks on import
            missing.append(f"{module} ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})")
    environment = {"python": platform.python_version(), "executable": sys.executable, "dry": DRY}
    if missing:
        message = (f"gpu_check: cannot import {', '.join(missing)}; run `python3 {PREPARE}` on a machine that "
                   f"reaches a package index and bring its .whl/ folder with the working tree (gpu_check.sh "
                   f"installs it offline)")
        _update_summary(Path(out), environment={**environment, "error": message})
        print(message, file=sys.stderr)
        return 2
    import torch

    packages = {}
    for name in ("torch", "transformers", "accelerate", "peft", "trl", "datasets", "dill", "multiprocess",
                 "pyarrow", "huggingface-hub", "deepspeed"):
        try:
            packages[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            packages[name] = None
    environment.update(packages=packages, cuda=torch.version.cuda, cuda_available=torch.cuda.is_available(),
                       gpu=torch.cuda.get_device_name() if torch.cuda.is_available() else None,
                       unsatisfied=_unsatisfied(("trl", "datasets", "multiprocess", "lns-surgery")))
    _update_summary(Path(out), environment=environment)
    for line in environment["unsatisfied"]:
        print(f"gpu_check: warning: {line}")
    print(json.dumps(environment, indent=1))
    if not DRY and not torch.cuda.is_available():
        message = (f"gpu_check: torch {torch.__version__} cannot use the GPU (a CPU-only build, or a driver "
                   f"mismatch); gpu_check.sh --dry-run runs the stages on the CPU")
        _update_summary(Path(out), environment={**environment, "error": message})
        print(message, file=sys.stderr)
        return 2
    return 0


def _update_summary(out: Path, **fields) -> dict:
    path = out / "summary.json"
    summary = read_json(path, {}) or {}
    summary.setdefault("mode", "dry" if DRY else "gpu")
    summary.setdefault("stages", [])
    summary.update(fields)
    write_json(path, summary)
    return summary


def cmd_summary(out: str, stage: str, status: str, seconds: str, limit: str, total: str) -> int:
    """Record one stage (status, seconds, limit and the figures its JSON holds) in summary.json, with the
    seconds the whole check has taken so far."""
    out = Path(out)
    summary = read_json(out / "summary.json", {}) or {}
    stages = [entry for entry in summary.get("stages", []) if entry.get("stage") != stage]
    record = read_json(out / f"{stage}.json", {}) or {}
    entry = {"stage": stage, "status": status, "seconds": int(seconds), "limit_seconds": int(limit)}
    if record.get("figures"):
        entry["figures"] = record["figures"]
    if record.get("problems"):
        entry["problems"] = record["problems"]
    stages.append(entry)
    _update_summary(out, stages=stages, seconds=int(total), finished=False)
    print("summary.json: " + ", ".join(f"{e['stage']} {e['status']}" for e in stages))
    return 0


def cmd_finish(out: str, status: str, total: str) -> int:
    """Mark summary.json complete: the overall status and seconds."""
    _update_summary(Path(out), status=status, seconds=int(total), finished=True)
    return 0


def cmd_report(out: str) -> int:
    """Print every stage's status and key figures, from summary.json."""
    summary = read_json(Path(out) / "summary.json", {}) or {}
    environment = summary.get("environment", {})
    print(f"gpu_check ({summary.get('mode')}): {environment.get('gpu') or 'no GPU'}, "
          f"packages {environment.get('packages')}")
    for entry in summary.get("stages", []):
        print(f"  {entry['stage']:<10} {entry['status']} in {entry['seconds']}s (limit {entry['limit_seconds']}s)")
        for key, line in _lines(entry.get("figures", {})):
            print(f"      {key}: {line}")
        for problem in entry.get("problems", []):
            print(f"      PROBLEM: {problem}")
    return 0


def _lines(figures, prefix=""):
    """One line per group of figures: ``name: key=value key=value``, nested groups under dotted names."""
    scalars = {key: value for key, value in figures.items() if not isinstance(value, dict)}
    if scalars and prefix:
        yield prefix, " ".join(f"{key}={_fmt(value)}" for key, value in scalars.items())
    elif scalars:
        for key, value in scalars.items():
            yield key, _fmt(value)
    for key, value in figures.items():
        if isinstance(value, dict):
            yield from _lines(value, f"{prefix}.{key}" if prefix else key)


def _fmt(value):
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


# --- shapes ---------------------------------------------------------------------------------------


def qwen25_05b_config(vocab_size: int = 151936):
    """Qwen2.5-0.5B's shapes (494M parameters with tied embeddings); tiny in dry mode."""
    from transformers import Qwen2Config

    if DRY:
        return Qwen2Config(vocab_size=min(vocab_size, 1024), hidden_size=64, intermediate_size=128,
                           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                           max_position_embeddings=512, tie_word_embeddings=True)
    return Qwen2Config(vocab_size=vocab_size, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                       num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
                       rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True)


def smollm2_135m_config():
    """SmolLM2-135M's shapes (30 blocks, 135M parameters with tied embeddings: the real weights live in
    ../shared, which does not travel to the GPU machine); tiny in dry mode."""
    from transformers import LlamaConfig

    if DRY:
        return LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                           tie_word_embeddings=True)
    return LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                       num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                       rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=True)


def _device():
    import torch

    return torch.device("cpu" if DRY else "cuda")


class Record:
    """A stage's JSON, written again after every addition."""

    def __init__(self, out: str, stage: str):
        self.path = Path(out) / f"{stage}.json"
        self.data = {"stage": stage, "mode": "dry" if DRY else "gpu", "figures": {}, "problems": [], "details": {}}
        self.save()

    def save(self):
        write_json(self.path, self.data)

    def figure(self, key, value):
        self.data["figures"][key] = value
        self.save()

    def detail(self, key, value):
        self.data["details"][key] = value
        self.save()

    def problem(self, text):
        self.data["problems"].append(text)
        self.save()

    def exit_status(self) -> int:
        return 1 if self.data["problems"] else 0


# --- exactness: LNS in bf16 against an independent hook-based reference ---------------------------


def cmd_exactness(out: str) -> int:
    """The LNS model against the stock model with forward hooks that scale each pre-norm's output
    (tests/lns_reference.py, which shares no code with the package), in bf16, for each attention
    implementation and under torch.compile.

    Weight form (``(c * w) * x_hat``) and hook (``(w * x_hat) * c``) round differently in bf16, so they
    agree to bf16 noise, not bit for bit. The measure: each one's RMS distance from the fp32 hooked
    reference, relative to the RMS of the fp32 logits (the largest-element distance is reported too, but
    the final rounding of the bf16 logits dominates it). LNS passes when it is no further from fp32 than the
    bf16 hooked reference is (x2), and when it differs from the stock model far more than that (the
    scaling is active).
    """
    import copy

    import torch

    sys.path.insert(0, str(REPO / "tests"))
    from lns_reference import hooked_reference
    from transformers import AutoModelForCausalLM

    from lns_surgery import apply_layernorm_scaling

    record = Record(out, "exactness")
    device = _device()
    config = smollm2_135m_config()
    record.detail("model", {"shape": "SmolLM2-135M (random weights)", "layers": config.num_hidden_layers,
                            "hidden_size": config.hidden_size, "device": str(device)})
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=torch.bfloat16)
    base = base.to(device).eval()
    lns = apply_layernorm_scaling(copy.deepcopy(base)).eval()
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(3, config.vocab_size, (2, 32) if DRY else (4, 512), generator=generator).to(device)

    reference32 = copy.deepcopy(base).float()
    reference32.set_attn_implementation("eager")
    with torch.no_grad(), hooked_reference(reference32, config.model_type):
        expected = reference32(ids).logits.float()
    del reference32
    rms, largest = float(expected.pow(2).mean().sqrt()), float(expected.abs().max())

    def distance(a, b):
        return float((a.float() - b.float()).pow(2).mean().sqrt()) / rms

    def worst(a, b):
        return float((a.float() - b.float()).abs().max()) / largest

    # A model loaded with flex attention, then converted: the conversion's meta-device trace of the blocks
    flexed = copy.deepcopy(base)
    flexed.set_attn_implementation("flex_attention")
    try:
        apply_layernorm_scaling(flexed)
        record.figure("convert_flex_attention_model", "ok")
    except Exception as exc:  # recorded for the report, not a failure of the comparison below
        record.figure("convert_flex_attention_model", f"{type(exc).__name__}: {exc}")
    del flexed

    for check in ("eager", "sdpa", "flex_attention", "compile"):
        attention = "sdpa" if check == "compile" else check
        started = time.perf_counter()
        try:
            for model in (base, lns):
                model.set_attn_implementation(attention)
            with torch.no_grad():
                stock = base(ids).logits
                with hooked_reference(base, config.model_type):
                    reference = base(ids).logits
                model = torch.compile(lns) if check == "compile" else lns
                got = model(ids).logits
            if device.type == "cuda":
                torch.cuda.synchronize()
        except Exception as exc:
            record.problem(f"{check}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
            continue
        entry = {"error_vs_fp32": distance(got, expected), "reference_error_vs_fp32": distance(reference, expected),
                 "max_error_vs_fp32": worst(got, expected), "max_reference_error_vs_fp32": worst(reference, expected),
                 "diff_vs_bf16_reference": distance(got, reference),
                 "bitwise_equal_bf16_reference": bool(torch.equal(got, reference)),
                 "change_vs_stock": distance(got, stock), "seconds": round(time.perf_counter() - started, 2)}
        entry["passed"] = (entry["error_vs_fp32"] <= 2 * entry["reference_error_vs_fp32"] + 1e-4
                           and entry["change_vs_stock"] > 5 * entry["error_vs_fp32"])
        record.figure(check, entry)
        if not entry["passed"]:
            record.problem(f"{check}: LNS is {entry['error_vs_fp32']:.3g} from the fp32 reference (the bf16 "
                           f"reference {entry['reference_error_vs_fp32']:.3g}), "
                           f"{entry['change_vs_stock']:.3g} from stock")
    return record.exit_status()


# --- sft: the shipped LoRA recipe, end to end, on a Qwen2.5-0.5B-shaped model ----------------------


def _synthetic_alpaca(count: int, seed: int = 0) -> list[dict]:
    """Sums, word reversal and next weekday: records a model can learn in a few dozen steps."""
    import random

    rng = random.Random(seed)
    days = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
    words = ["garden", "river", "window", "silver", "planet", "market", "candle", "forest", "bridge", "pocket"]
    records = []
    for _ in range(count):
        kind = rng.randrange(3)
        if kind == 0:
            a, b = rng.randint(0, 999), rng.randint(0, 999)
            records.append({"instruction": "Add the two numbers.", "input": f"{a} and {b}", "output": str(a + b)})
        elif kind == 1:
            word = rng.choice(words)
            records.append({"instruction": "Reverse the letters of the word.", "input": word, "output": word[::-1]})
        else:
            day = rng.randrange(7)
            records.append({"instruction": f"Which day comes after {days[day]}?", "input": "",
                            "output": days[(day + 1) % 7]})
    return records


def _bpe_tokenizer(texts, vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


def _fresh_load(folders: dict, logits: bool = True, ids_count: int = 40) -> dict:
    """Load each folder in a new process that cannot import lns_surgery (the checkpoint's own code must be
    enough) and run it on the stage's device; returns {name: {"module", "alpha", "finite", "logits"}} or
    {"error": ...}."""
    code = f"""
import json, sys, torch
sys.modules["lns_surgery"] = None
from transformers import AutoModelForCausalLM
device = {str(_device())!r}
ids = torch.arange(1, {ids_count + 1}).unsqueeze(0).to(device)
out = {{}}
for name, folder in {json.dumps({k: str(v) for k, v in folders.items()})}.items():
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).to(device).eval()
    with torch.no_grad():
        logits = model(ids).logits.float()
    out[name] = {{"module": type(model).__module__, "alpha": model.config.lns["alpha"],
                 "finite": bool(torch.isfinite(logits).all()), "logits": logits.cpu().tolist() if {logits} else None}}
print(json.dumps(out))
"""
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    # the wheels installed for this check stay visible; the repository (and so lns_surgery) does not
    site = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and Path(p).resolve() != REPO]
    if site:
        env["PYTHONPATH"] = os.pathsep.join(site)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd="/",
                          stdin=subprocess.DEVNULL)
    if done.returncode != 0:
        return {"error": done.stderr[-2000:]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def cmd_sft(out: str, work: str) -> int:
    """recipes/alpaca.yaml (LoRA, converted to LNS on load) on a random Qwen2.5-0.5B-shaped model with
    synthetic records and a BPE tokenizer trained on them, shortened; then: the merged export is a
    full-strength LNS checkpoint, the held-out loss fell, and a fresh process runs the export with its own
    code. Figures: the run's own throughput record (tokens/s, MFU, peak memory) from metrics.json."""
    import math

    import torch
    from transformers import AutoModelForCausalLM

    from lns_surgery.training.data import alpaca_prompt

    record = Record(out, "sft")
    work = Path(work) / "sft"
    work.mkdir(parents=True, exist_ok=True)
    records = _synthetic_alpaca(400 if DRY else 3000)
    with open(work / "data.jsonl", "w", encoding="utf-8") as handle:
        for item in records:
            handle.write(json.dumps(item) + "\n")
    tokenizer = _bpe_tokenizer([alpaca_prompt(r["instruction"], r["input"]) + r["output"] for r in records], 1024)
    # the vocabulary stays Qwen's 151936 on the GPU so that the LM head costs what it costs in the real
    # model; the tokenizer uses its first 1024 rows
    config = qwen25_05b_config()
    config.eos_token_id = config.pad_token_id = tokenizer.eos_token_id
    config.bos_token_id = None
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32 if DRY else torch.bfloat16)
    model.save_pretrained(work / "base")  # stock Qwen2: the recipe converts it to LNS on load
    tokenizer.save_pretrained(work / "base")
    record.detail("model", {"shape": "Qwen2.5-0.5B (random weights)", "parameters": model.num_parameters(),
                            "records": len(records), "vocabulary": len(tokenizer)})
    del model

    steps = 4 if DRY else 40
    command = [sys.executable, "-m", "lns_surgery", "sft", "--recipe", str(REPO / "recipes/alpaca.yaml"),
               "--model_name_or_path", str(work / "base"), "--dataset_name", str(work / "data.jsonl"),
               "--output_dir", str(work / "run"), "--max_steps", str(steps), "--num_train_epochs", "1",
               "--per_device_train_batch_size", "4" if DRY else "32", "--gradient_accumulation_steps", "1",
               "--max_length", "64" if DRY else "256", "--learning_rate", "3e-3" if DRY else "1e-3",
               "--warmup_steps", "1" if DRY else "5", "--eval_strategy", "steps", "--eval_steps", str(steps // 2),
               "--eval_on_start", "true", "--save_strategy", "no", "--report_to", "none",
               "--logging_steps", "1" if DRY else "10", "--disable_tqdm", "true", "--overwrite"]
    if DRY:  # TRL turns bf16 on under use_cpu unless told otherwise
        command += ["--dtype", "float32", "--bf16", "false", "--use_cpu", "true"]
    else:
        command += ["--dtype", "bfloat16", "--bf16", "true"]
    started = time.perf_counter()
    trained = subprocess.run(command, stdin=subprocess.DEVNULL)
    record.figure("run_seconds", round(time.perf_counter() - started, 1))
    if trained.returncode != 0:
        record.problem(f"lns-surgery sft exited with {trained.returncode}")
        return 1

    run = work / "run"
    metrics = json.loads((run / "metrics.json").read_text())
    config = json.loads((run / "config.json").read_text())
    evals = [entry["eval_loss"] for entry in metrics["log_history"] if "eval_loss" in entry]
    train = metrics["train"]
    final = (metrics.get("eval") or {}).get("eval_loss")
    for key in ("steady_tokens_per_second", "mfu", "peak_gpu_memory_gb", "attn_implementation"):
        record.figure(key, train.get(key))
    record.figure("global_step", train.get("global_step"))
    record.figure("eval_loss_first", evals[0] if evals else None)
    record.figure("eval_loss_final", final)
    if config.get("model_type") != "lns_qwen2" or (config.get("lns") or {}).get("alpha") != 1.0:
        record.problem(f"the export is not a full-strength LNS checkpoint (model_type {config.get('model_type')}, "
                       f"lns {config.get('lns')})")
    if final is None or not math.isfinite(final) or not evals or not final < evals[0]:
        record.problem(f"held-out loss did not fall: {evals[0] if evals else None} -> {final}")
    loaded = _fresh_load({"merged": run}, logits=False)
    merged = loaded.get("merged", {})
    record.figure("fresh_process_load", {"module": merged.get("module"), "finite": merged.get("finite")}
                  if "error" not in loaded else loaded)
    if not merged.get("finite") or not str(merged.get("module", "")).startswith("transformers_modules"):
        record.problem("a fresh process could not run the export with its own code: "
                       f"{loaded.get('error', merged.get('module'))}")
    return record.exit_status()


# --- train: step time, tokens/s, MFU and peak memory of LoRA and full fine-tuning -----------------


def cmd_train(out: str) -> int:
    """On a Qwen2.5-0.5B-shaped and a SmolLM2-135M-shaped LNS model (random weights, bf16, sdpa), one
    fixed batch: LNS / stock step time and distillation / plain LoRA step time (scripts/bench_train.py's
    measurements), then full fine-tuning and LoRA (r 16, all linear layers) alone on the GPU: median step
    time, tokens/s, MFU (6 x parameters x tokens / the GPU's dense bf16 peak, for both) and peak memory."""
    import statistics

    import torch
    from peft import LoraConfig, get_peft_model

    sys.path.insert(0, str(REPO / "scripts"))
    import bench_train

    from lns_surgery.training.performance import gpu_peak_tflops

    record = Record(out, "train")
    device = _device()
    dtype = torch.float32 if DRY else torch.bfloat16
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    peak = gpu_peak_tflops(torch.cuda.get_device_name()) if device.type == "cuda" else None
    rows, length = (2, 64) if DRY else (8, 2048)
    warmup, steps = (1, 2) if DRY else (3, 8)
    record.detail("setup", {"dtype": str(dtype), "batch": [rows, length], "warmup_steps": warmup,
                            "timed_steps": steps, "peak_bf16_tflops": peak, "attn_implementation": "sdpa",
                            "flops_per_token": "6 x parameters (embeddings included, attention scores not)"})

    def timed(model, batch, parameters):
        """Median step time and peak memory of training ``parameters`` of ``model`` on ``batch``."""
        optimizer = torch.optim.AdamW(parameters, lr=1e-5)
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        times = []
        for step in range(warmup + steps):
            bench_train.sync(device)
            started = time.perf_counter()
            bench_train.train_step(model, optimizer, batch, device, None)
            bench_train.sync(device)
            if step >= warmup:
                times.append(time.perf_counter() - started)
        memory = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
        del optimizer
        return statistics.median(times), memory

    for name, config in (("qwen2.5-0.5b", qwen25_05b_config()), ("smollm2-135m", smollm2_135m_config())):
        base, lns = bench_train.build_models(config, device, dtype, "sdpa")
        parameters = sum(p.numel() for p in base.parameters())
        ids = torch.randint(3, config.vocab_size, (rows, length), generator=torch.Generator().manual_seed(1))
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
        tokens = ids.numel()
        figures = {"parameters": parameters}

        def throughput(step_seconds, memory):
            per_second = tokens / step_seconds
            return {"step_s": step_seconds, "tokens_per_second": per_second,
                    "mfu": per_second * 6 * parameters / (peak * 1e12) if peak else None,
                    "peak_memory_gb": round(memory, 3) if memory is not None else None}

        def measure(key, what, function):
            """One measurement; a failing one is a problem of the stage, and the others still run."""
            try:
                figures[key] = what(function())
            except Exception as exc:
                record.problem(f"{name} {key}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
            record.figure(name, figures)
            if device.type == "cuda":
                torch.cuda.empty_cache()

        measure("lns_over_stock_step", lambda m: m["lns"] / m["base"],
                lambda: bench_train.time_lns_overhead(base, lns, batch, device, None, warmup, steps))
        del base
        measure("distill_over_plain_lora_step", lambda m: m["distill"] / m["plain"],
                lambda: bench_train.time_distillation_overhead(lns, batch, device, None, warmup, steps))
        measure("full", lambda timing: throughput(*timing), lambda: timed(lns, batch, list(lns.parameters())))
        student = get_peft_model(lns, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear"))
        student.train()
        measure("lora", lambda timing: throughput(*timing),
                lambda: timed(student, batch, [p for p in student.parameters() if p.requires_grad]))
        del student, lns
    return record.exit_status()


# --- fsdp / zero3: single-GPU sharded training against an unlaunched run --------------------------


def _sharded_prepare(work: Path) -> tuple[dict, dict]:
    """Once for both stages: a random stock Llama, a BPE tokenizer and text data of its own; the recipe keys."""
    import random

    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    work.mkdir(parents=True, exist_ok=True)
    if not (work / "base" / "config.json").is_file():
        rng = random.Random(0)
        words = ["the", "river", "window", "silver", "planet", "market", "candle", "forest", "bridge", "pocket",
                 "runs", "sings", "falls", "grows", "under", "over", "slowly", "bright", "cold", "small"]
        texts = [" ".join(rng.choice(words) for _ in range(rng.randint(40, 120))) + "." for _ in range(400)]
        with open(work / "data.jsonl", "w", encoding="utf-8") as handle:
            for text in texts:
                handle.write(json.dumps({"text": text}) + "\n")
        tokenizer = _bpe_tokenizer(texts, 512)
        # tied embeddings, as in most small checkpoints: the sharded save must keep the tie
        config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64 if DRY else 256,
                             intermediate_size=128 if DRY else 688, num_hidden_layers=2 if DRY else 6,
                             num_attention_heads=4 if DRY else 8, num_key_value_heads=2 if DRY else 4,
                             max_position_embeddings=256, tie_word_embeddings=True,
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                             bos_token_id=None)
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(config).save_pretrained(work / "base")  # stock: converted on load
        tokenizer.save_pretrained(work / "base")
    settings = {"model_name_or_path": str(work / "base"), "lns_convert": True, "lns_ramp_steps": 2,
                "dataset_name": str(work / "data.jsonl"), "dataset_format": "text", "max_steps": 3 if DRY else 4,
                "max_length": 64 if DRY else 128, "per_device_train_batch_size": 4 if DRY else 8,
                "learning_rate": 1e-3, "bf16": False, "logging_steps": 1, "activation_checkpointing": False,
                "save_strategy": "no", "report_to": "none", "disable_tqdm": True, "seed": 0}
    lora = {"use_peft": True, "lora_r": 8, "lora_alpha": 16, "lora_dropout": 0.0}  # dropout would differ
    return settings, lora


def cmd_sharded(launcher: str, out: str, work: str) -> int:
    """recipes/accelerate/<launcher>.yaml on one GPU (fp32, so that the runs compare closely):
    scripts/sharded_rank.py trains a random stock Llama converted to LNS on load with a 2-step ramp, full
    fine-tuning then LoRA, launched and then unlaunched. Checks: the run really was sharded (DTensor
    parameters and one FSDP unit per block / ZeRO-3-partitioned parameters), every LNS scale followed the
    ramp, the merged LoRA export was rebuilt from base + adapter, the saved full fine-tuning weights equal
    the unlaunched run's, and a fresh process loads both outputs with their own code and gets the
    unlaunched run's logits."""
    import importlib.util
    import math

    if launcher == "zero3" and importlib.util.find_spec("deepspeed") is None:
        print("deepspeed is not installed")
        return SKIPPED
    import torch
    from safetensors.torch import load_file

    record = Record(out, launcher)
    work = Path(work)
    settings, lora = _sharded_prepare(work / "sharded-data")
    if DRY and launcher == "fsdp":
        settings["use_cpu"] = True  # gloo on the CPU; ZeRO-3 finds the CPU itself (accelerate skips it under use_cpu)
    script = str(REPO / "scripts" / "sharded_rank.py")
    runs = {"sharded": work / launcher / "sharded", "single": work / launcher / "single"}
    for folder in runs.values():
        folder.mkdir(parents=True, exist_ok=True)
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
              str(REPO / f"recipes/accelerate/{launcher}.yaml"), "--num_processes", "1", "--mixed_precision", "no",
              "--main_process_port", "0", script, launcher, json.dumps(settings), str(runs["sharded"]),
              json.dumps(lora)]
    started = time.perf_counter()
    if subprocess.run(launch, stdin=subprocess.DEVNULL).returncode != 0:
        record.problem(f"accelerate launch with recipes/accelerate/{launcher}.yaml failed")
        return 1
    record.figure("launched_seconds", round(time.perf_counter() - started, 1))
    single = [sys.executable, script, "none", json.dumps(settings), str(runs["single"]), json.dumps(lora)]
    if subprocess.run(single, stdin=subprocess.DEVNULL).returncode != 0:
        record.problem("the unlaunched run failed")
        return 1

    expected_alphas = [min(1.0, step / settings["lns_ramp_steps"]) for step in range(settings["max_steps"] + 1)]
    for mode in ("full", "lora"):
        seen = json.loads((runs["sharded"] / f"rank0-{mode}.json").read_text())
        record.detail(mode, {key: value for key, value in seen.items() if key != "steps"})
        if launcher == "fsdp":
            really = (seen["distributed_type"] == "FSDP" and seen["is_fsdp_enabled"]
                      and seen["dtensor_params"] == seen["params"] > 0 and seen["sharded_blocks"] == seen["layers"])
        else:
            really = (seen["distributed_type"] == "DEEPSPEED" and seen["is_deepspeed_enabled"]
                      and seen["partitioned_params"] == seen["params"] > 0)
        record.figure(f"{mode}_sharded", bool(really))
        if not really:
            record.problem(f"{mode}: the run was not sharded as {launcher}")
        alphas = [step["alpha"] for step in seen["steps"]]
        wrong = [(name, step["alpha"], scale) for step in seen["steps"]
                 for name, (layer, scale, _) in step["norms"].items()
                 if abs(scale - (1 + step["alpha"] * (1 / math.sqrt(layer + 1) - 1))) > 1e-12]
        ramp = (alphas == expected_alphas and not wrong
                and all(len(step["norms"]) == 2 * seen["layers"] for step in seen["steps"]))
        record.figure(f"{mode}_scales_followed_ramp", ramp)
        if not ramp:
            record.problem(f"{mode}: LNS scales off the ramp: alphas {alphas} (expected {expected_alphas}), "
                           f"wrong {wrong[:3]}")
        if mode == "lora" and not (seen["rebuilds"] and seen["load_calls"] == 2 and seen["final_whole"]):
            record.problem(f"lora: the merged export was not rebuilt from base + adapter: {seen['rebuilds']}, "
                           f"{seen['load_calls']} loads, whole {seen['final_whole']}")
        if mode == "full":
            saved = load_file(runs["sharded"] / mode / "model.safetensors")
            expected = load_file(runs["single"] / mode / "model.safetensors")
            missing = sorted(set(expected) - set(saved))
            worst = max(float((saved[k].float() - t.float()).abs().max()) for k, t in expected.items() if k in saved)
            record.figure("full_state_dict_max_abs_diff", worst)
            if missing or worst > 3e-4:
                record.problem(f"full: saved weights differ from the unlaunched run's: missing {missing}, "
                               f"max diff {worst:.3g}")

    loaded = _fresh_load({f"{run}-{mode}": runs[run] / mode for run in runs for mode in ("full", "lora")})
    if "error" in loaded:
        record.problem(f"a fresh process could not load the outputs with their own code: {loaded['error'][-500:]}")
        return 1
    for mode in ("full", "lora"):
        entry, other = loaded[f"sharded-{mode}"], loaded[f"single-{mode}"]
        diff = float((torch.tensor(entry["logits"]) - torch.tensor(other["logits"])).abs().max())
        record.figure(f"{mode}_logits_max_abs_diff", diff)
        if not entry["module"].startswith("transformers_modules") or entry["alpha"] != 1.0:
            record.problem(f"{mode}: the sharded run's output did not load with its own code as full-strength LNS")
        elif not diff < 1e-3:
            record.problem(f"{mode}: logits differ from the unlaunched run's by {diff:.3g}")
    return record.exit_status()


def main(argv) -> int:
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    stage, args = argv[0], argv[1:]
    commands = {"wheels": cmd_wheels, "setup": cmd_setup, "summary": cmd_summary, "finish": cmd_finish,
                "report": cmd_report,
                "exactness": cmd_exactness, "sft": cmd_sft, "train": cmd_train,
                "fsdp": lambda out, work: cmd_sharded("fsdp", out, work),
                "zero3": lambda out, work: cmd_sharded("zero3", out, work)}
    if stage not in commands:
        print(f"gpu_check_stages: unknown stage {stage!r} ({', '.join(commands)})", file=sys.stderr)
        return 2
    return commands[stage](*args)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
