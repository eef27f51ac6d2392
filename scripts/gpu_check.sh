#!/usr/bin/env bash
# GPU check: the benchmarks' GPU figures, a short bf16 SFT of a 0.5B-shaped LNS model, and single-GPU
# FSDP2 and ZeRO-3 runs, on one H100/H200-class GPU. Needs no network: the models have random weights
# (the SFT one with Qwen2.5-0.5B's shapes), and their data and tokenizers are generated here.
#
#     bash scripts/gpu_check.sh [OUT_DIR]        # default OUT_DIR: gpu_results
#     GPU_CHECK_STAGES="fsdp zero3" bash scripts/gpu_check.sh   # only the named stages
#
# Stages (each under its own time limit; a stage that fails or times out is reported and the others
# still run; stages 1-4 take 8 minutes at most, 5-6 another 5.5):
#   1. sft           random Qwen2.5-0.5B-shaped model, converted to LNS on load by recipes/alpaca.yaml,
#                    LoRA SFT in bf16 on synthetic Alpaca records (sums, word reversal, next weekday);
#                    then checks: the merged export is an LNS checkpoint, its held-out loss fell, and a
#                    fresh process loads it with trust_remote_code on the GPU and gets finite logits
#   2. bench_train   scripts/bench_train.py --gpu (LNS step-time overhead, packing vs padding, MFU)
#   3. bench_convert scripts/bench_convert.py (conversion vs cp; disk-bound, no GPU mode)
#   4. bench_analyze scripts/bench_analyze.py (layer-removal sweep cost; it has no device option, so
#                    this is the machine's CPU figure)
#   5. fsdp          single-GPU FSDP2 through recipes/accelerate/fsdp.yaml (fp32): a random stock Llama
#                    converted to LNS on load with a 2-step ramp, 4 steps of full fine-tuning and of LoRA,
#   6. zero3         and the same through recipes/accelerate/zero3.yaml (needs deepspeed; "skipped"
#                    without it); then checks: the run really was sharded (DTensor parameters and one
#                    FSDP unit per block / ZeRO-3-partitioned parameters), every LNS scale followed the
#                    ramp, the merged LoRA export was rebuilt from base + adapter, and a fresh process
#                    loads both outputs with their own code and gets the logits of an unlaunched run
# Writes into OUT_DIR: summary.json (status and seconds per stage), logs/<stage>.log, sft/ (metrics.json,
# checks.json), bench_train.json, bench_convert.json, bench_analyze.json, fsdp/ and zero3/ (checks.json
# and what each run recorded). Exit status: 0 when every stage passed or was skipped, 1 when one failed
# or timed out, 2 when there is no usable GPU (checked first, in seconds).

set -uo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT_DIR="${1:-gpu_results}"
PYTHON="${PYTHON:-python}"
# seconds per stage: 120 + 180 + 120 + 60 = 480 s at most for 1-4, 150 + 180 = 330 s for 5-6
SFT_LIMIT="${SFT_LIMIT:-120}"
TRAIN_LIMIT="${TRAIN_LIMIT:-180}"
CONVERT_LIMIT="${CONVERT_LIMIT:-120}"
ANALYZE_LIMIT="${ANALYZE_LIMIT:-60}"
FSDP_LIMIT="${FSDP_LIMIT:-150}"
ZERO3_LIMIT="${ZERO3_LIMIT:-180}"
GPU_CHECK_STAGES="${GPU_CHECK_STAGES:-sft bench_train bench_convert bench_analyze fsdp zero3}"
SKIPPED=77  # a stage's exit status for "cannot run here" (zero3 without deepspeed)

fail_setup() {
    echo "gpu_check: $*" >&2
    exit 2
}

# --- fail fast without a GPU --------------------------------------------------------------------
command -v nvidia-smi >/dev/null 2>&1 || fail_setup "no NVIDIA GPU here (nvidia-smi not found); run this on a CUDA machine"
nvidia-smi -L >/dev/null 2>&1 || fail_setup "nvidia-smi cannot list a GPU: $(nvidia-smi -L 2>&1 | head -n 1)"
CUDA_REPORT="$("$PYTHON" -c 'import torch; print(torch.__version__, torch.version.cuda, torch.cuda.is_available())' 2>&1)" \
    || fail_setup "torch cannot be imported: $(echo "$CUDA_REPORT" | tail -n 1)"
case "$CUDA_REPORT" in
    *" True") ;;
    *) fail_setup "torch ${CUDA_REPORT% *} cannot use the GPU (a CPU-only build, or a driver mismatch);" \
                  "install a CUDA build of torch" ;;
esac

cd "$REPO" || exit 2
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"   # works without `pip install -e .` too
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
"$PYTHON" -c "import lns_surgery, transformers, trl, peft" 2>/dev/null \
    || fail_setup "lns_surgery's dependencies are missing: pip install -e . (from $REPO)"

mkdir -p "$OUT_DIR/logs" || exit 2
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/lns-gpu-check.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
echo "gpu_check: $(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | head -n 1); torch $CUDA_REPORT; writing $OUT_DIR"

declare -a STAGES=()
FAILED=0
run_stage() {  # run_stage NAME LIMIT_SECONDS COMMAND...
    local name="$1" limit="$2"
    shift 2
    case " $GPU_CHECK_STAGES " in *" $name "*) ;; *) return 0 ;; esac
    local start=$SECONDS status
    echo "== $name (limit ${limit}s)"
    timeout --kill-after=10 "$limit" "$@" >"$OUT_DIR/logs/$name.log" 2>&1
    local code=$?
    case $code in
        0) status=passed ;;
        "$SKIPPED") status="skipped: $(tail -n 1 "$OUT_DIR/logs/$name.log")" ;;
        124 | 137) status=timeout; FAILED=1 ;;
        *) status="failed (exit $code)"; FAILED=1 ;;
    esac
    local seconds=$((SECONDS - start))
    echo "   $status in ${seconds}s; log: $OUT_DIR/logs/$name.log"
    [ "$status" = passed ] || tail -n 5 "$OUT_DIR/logs/$name.log" | sed 's/^/   | /'
    STAGES+=("{\"stage\": \"$name\", \"status\": \"$status\", \"seconds\": $seconds, \"limit_seconds\": $limit}")
}

# --- 1. bf16 LoRA SFT of a 0.5B-shaped LNS model ------------------------------------------------
sft_prepare() {  # synthetic Alpaca data, a byte-level BPE tokenizer trained on it, the random model
    "$PYTHON" - "$WORK" <<'PY'
import json, random, sys
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast, Qwen2Config

from lns_surgery.training.data import alpaca_prompt

work = Path(sys.argv[1])
rng = random.Random(0)
days = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
words = ["garden", "river", "window", "silver", "planet", "market", "candle", "forest", "bridge", "pocket"]
records = []
for _ in range(3000):
    kind = rng.randrange(3)
    if kind == 0:
        a, b = rng.randint(0, 999), rng.randint(0, 999)
        records.append({"instruction": "Add the two numbers.", "input": f"{a} and {b}", "output": str(a + b)})
    elif kind == 1:
        word = rng.choice(words)
        records.append({"instruction": "Reverse the letters of the word.", "input": word, "output": word[::-1]})
    else:
        day = rng.randrange(7)
        records.append({"instruction": f"Which day comes after {days[day]}?", "input": "", "output": days[(day + 1) % 7]})
with open(work / "sft-data.jsonl", "w", encoding="utf-8") as handle:
    for record in records:
        handle.write(json.dumps(record) + "\n")

texts = [alpaca_prompt(r["instruction"], r["input"]) + r["output"] for r in records]
bpe = Tokenizer(models.BPE())
bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
bpe.decoder = decoders.ByteLevel()
bpe.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=1024, special_tokens=["<|endoftext|>"],
                                                   initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>", pad_token="<|endoftext|>")

# Qwen2.5-0.5B's shapes (494M parameters with tied embeddings); the vocabulary stays 151936 so that the
# LM head costs what it costs in the real model, the tokenizer just uses its first 1024 rows.
config = Qwen2Config(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                     num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
                     rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True,
                     eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=None)
torch.manual_seed(0)
with torch.device("cuda"):
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
model.save_pretrained(work / "base")  # stock Qwen2: the recipe converts it to LNS on load
tokenizer.save_pretrained(work / "base")
print(f"{len(records)} records, vocabulary {len(tokenizer)}, model {sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters")
PY
}

sft_check() {  # the export is an LNS checkpoint that a fresh process loads and runs; the loss fell
    "$PYTHON" - "$OUT_DIR/sft" "$WORK/sft" <<'PY'
import json, math, subprocess, sys, textwrap
from pathlib import Path

record, model_dir = Path(sys.argv[1]), Path(sys.argv[2])
metrics = json.loads((model_dir / "metrics.json").read_text())
config = json.loads((model_dir / "config.json").read_text())
evals = [entry["eval_loss"] for entry in metrics["log_history"] if "eval_loss" in entry]
fresh = subprocess.run([sys.executable, "-c", textwrap.dedent(f"""
    import sys, json, torch
    sys.modules["lns_surgery"] = None  # the checkpoint's own code must be enough
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained({str(model_dir)!r}, trust_remote_code=True, dtype=torch.bfloat16).cuda().eval()
    tokenizer = AutoTokenizer.from_pretrained({str(model_dir)!r}, trust_remote_code=True)
    ids = tokenizer("Which day comes after Monday?", return_tensors="pt").input_ids.cuda()
    with torch.no_grad():
        logits = model(ids).logits
    print(json.dumps({{"class": type(model).__name__, "module": type(model).__module__,
                      "finite": bool(torch.isfinite(logits).all()), "dtype": str(logits.dtype)}}))
""")], capture_output=True, text=True)
loaded = json.loads(fresh.stdout.strip().splitlines()[-1]) if fresh.returncode == 0 else {"error": fresh.stderr[-2000:]}
checks = {
    "model_type": config.get("model_type"),
    "lns_alpha": (config.get("lns") or {}).get("alpha"),
    "eval_loss_first": evals[0] if evals else None,
    "eval_loss_final": metrics["eval"]["eval_loss"] if metrics.get("eval") else None,
    "global_step": metrics["train"]["global_step"],
    "train_tokens_per_second": metrics["train"].get("train_tokens_per_second"),
    "fresh_process_load": loaded,
}
problems = []
if checks["model_type"] != "lns_qwen2" or checks["lns_alpha"] != 1.0:
    problems.append(f"the export is not a full-strength LNS checkpoint "
                    f"(model_type {checks['model_type']}, alpha {checks['lns_alpha']})")
final, first = checks["eval_loss_final"], checks["eval_loss_first"]
if final is None or not math.isfinite(final) or first is None or not final < first:
    problems.append(f"held-out loss did not fall: {first} -> {final}")
if not loaded.get("finite") or not str(loaded.get("module", "")).startswith("transformers_modules"):
    problems.append(f"a fresh process could not run the export with its own code: {loaded}")
checks["problems"] = problems
record.mkdir(parents=True, exist_ok=True)
(record / "checks.json").write_text(json.dumps(checks, indent=2) + "\n")
(record / "metrics.json").write_text((model_dir / "metrics.json").read_text())
print(json.dumps(checks, indent=2))
sys.exit(1 if problems else 0)
PY
}

sft_stage() {
    sft_prepare || return 1
    # the shipped GPU recipe, on the local model and data, shortened; bf16 weights and autocast
    "$PYTHON" -m lns_surgery sft --recipe recipes/alpaca.yaml \
        --model_name_or_path "$WORK/base" --dataset_name "$WORK/sft-data.jsonl" --output_dir "$WORK/sft" \
        --dtype bfloat16 --bf16 true --max_steps 60 --num_train_epochs 1 --per_device_train_batch_size 32 \
        --gradient_accumulation_steps 1 --max_length 256 --learning_rate 1e-3 --warmup_steps 5 \
        --eval_strategy steps --eval_steps 30 --eval_on_start true --save_strategy no --report_to none \
        --logging_steps 10 --overwrite || return 1
    sft_check
}
export -f sft_prepare sft_check sft_stage
export PYTHON WORK OUT_DIR
run_stage sft "$SFT_LIMIT" bash -c sft_stage

# --- 2-4. the benchmarks ------------------------------------------------------------------------
run_stage bench_train "$TRAIN_LIMIT" "$PYTHON" scripts/bench_train.py --gpu --json "$OUT_DIR/bench_train.json"
run_stage bench_convert "$CONVERT_LIMIT" "$PYTHON" scripts/bench_convert.py --repeats 2 \
    --workdir "$WORK/convert" --out "$OUT_DIR/bench_convert.json"
run_stage bench_analyze "$ANALYZE_LIMIT" "$PYTHON" scripts/bench_analyze.py --out "$OUT_DIR/bench_analyze.json"

# --- 5-6. single-GPU FSDP2 and ZeRO-3 -----------------------------------------------------------
sharded_prepare() {  # once for both stages: a random stock Llama, a BPE tokenizer and text data of its own
    [ -f "$WORK/sharded/base/config.json" ] && return 0
    "$PYTHON" - "$WORK/sharded" <<'PY'
import json, random, sys
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

work = Path(sys.argv[1])
work.mkdir(parents=True, exist_ok=True)
rng = random.Random(0)
words = ["the", "river", "window", "silver", "planet", "market", "candle", "forest", "bridge", "pocket",
         "runs", "sings", "falls", "grows", "under", "over", "slowly", "bright", "cold", "small"]
texts = [" ".join(rng.choice(words) for _ in range(rng.randint(40, 120))) + "." for _ in range(400)]
with open(work / "data.jsonl", "w", encoding="utf-8") as handle:
    for text in texts:
        handle.write(json.dumps({"text": text}) + "\n")
bpe = Tokenizer(models.BPE())
bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
bpe.decoder = decoders.ByteLevel()
bpe.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=512, special_tokens=["<|endoftext|>"],
                                                   initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
# tied embeddings, as in most small checkpoints: the sharded save must keep the tie
config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=256, intermediate_size=688, num_hidden_layers=6,
                     num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=256,
                     tie_word_embeddings=True, eos_token_id=tokenizer.eos_token_id,
                     pad_token_id=tokenizer.pad_token_id, bos_token_id=None)
torch.manual_seed(0)
AutoModelForCausalLM.from_config(config).save_pretrained(work / "base")  # stock: converted on load
tokenizer.save_pretrained(work / "base")
PY
}

sharded_write_run() {  # WORK/sharded_run.py LAUNCHER OUT: both trainings in one process, recording what they saw
    cat >"$WORK/sharded_run.py" <<'PY'
import json, os, re, sys
from pathlib import Path

from accelerate.state import AcceleratorState
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor
from transformers import TrainerCallback

from lns_surgery.training import models
from lns_surgery.training.run import _is_sharded_or_quantized, train_from_dict

launcher, out = sys.argv[1], Path(sys.argv[2])
work = Path(os.environ["WORK"]) / "sharded"
load_calls = []
_load_model = models.load_model


def counting_load_model(*args, **kwargs):
    load_calls.append(1)
    return _load_model(*args, **kwargs)


models.load_model = counting_load_model  # the merged-LoRA rebuild loads the base a second time


def lns_model(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def scales(model):
    model = lns_model(model)
    found = {name: [int(re.search(r"layers\.(\d+)\.", name).group(1)), module.lns_scale]
             for name, module in model.named_modules() if hasattr(module, "lns_scale")}
    return {"alpha": model.config.lns["alpha"], "norms": found}


class Record(TrainerCallback):
    def __init__(self):
        self.seen = {}

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        params = list(model.parameters())
        self.seen.update(
            distributed_type=AcceleratorState().distributed_type.value, params=len(params),
            dtensor_params=sum(isinstance(p, DTensor) for p in params),
            partitioned_params=sum(hasattr(p, "ds_id") and p.numel() == 0 for p in params),
            sharded_blocks=sum(isinstance(block, FSDPModule) for block in lns_model(model).model.layers),
            layers=len(lns_model(model).model.layers), steps=[scales(model)])

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.seen["steps"].append(scales(model))


settings = {"model_name_or_path": str(work / "base"), "lns_convert": True, "lns_ramp_steps": 2,
            "dataset_name": str(work / "data.jsonl"), "dataset_format": "text", "max_steps": 4, "max_length": 128,
            "per_device_train_batch_size": 8, "learning_rate": 1e-3, "bf16": False, "logging_steps": 1,
            "activation_checkpointing": False, "save_strategy": "no", "report_to": "none", "disable_tqdm": True,
            "seed": 0}
lora = {"use_peft": True, "lora_r": 8, "lora_alpha": 16, "lora_dropout": 0.0}
for mode, extra in (("full", {}), ("lora", lora)):
    load_calls.clear()
    record = Record()
    result = train_from_dict({**settings, **extra, "output_dir": str(out / mode)}, "pretrain", callbacks=[record])
    params = list(result.model.parameters())
    record.seen.update(
        is_fsdp_enabled=result.trainer.is_fsdp_enabled, is_deepspeed_enabled=result.trainer.is_deepspeed_enabled,
        rebuilds=_is_sharded_or_quantized(result.trainer), load_calls=len(load_calls),
        final_whole=all(not isinstance(p, DTensor) and not hasattr(p, "ds_id") and p.numel() > 0 for p in params))
    (out / f"record-{mode}.json").write_text(json.dumps(record.seen, indent=1) + "\n")
PY
}

sharded_check() {  # sharded_check LAUNCHER RECORD_DIR SHARDED_DIR SINGLE_DIR
    "$PYTHON" - "$@" <<'PY'
import json, math, subprocess, sys, textwrap
from pathlib import Path

import torch
from safetensors.torch import load_file

launcher, record_dir, sharded, single = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4])
problems, checks = [], {}
for mode in ("full", "lora"):
    seen = json.loads((sharded / f"record-{mode}.json").read_text())
    (record_dir / f"record-{mode}.json").write_text(json.dumps(seen, indent=1) + "\n")
    if launcher == "fsdp":
        really = (seen["distributed_type"] == "FSDP" and seen["is_fsdp_enabled"]
                  and seen["dtensor_params"] == seen["params"] > 0 and seen["sharded_blocks"] == seen["layers"])
    else:
        really = (seen["distributed_type"] == "DEEPSPEED" and seen["is_deepspeed_enabled"]
                  and seen["partitioned_params"] == seen["params"] > 0)
    if not really:
        problems.append(f"{mode}: the run was not sharded as {launcher}: {json.dumps({k: v for k, v in seen.items() if k != 'steps'})}")
    alphas = [step["alpha"] for step in seen["steps"]]
    wrong = [(name, step["alpha"], scale) for step in seen["steps"] for name, (layer, scale) in step["norms"].items()
             if abs(scale - (1 + step["alpha"] * (1 / math.sqrt(layer + 1) - 1))) > 1e-12]
    if alphas != [0.0, 0.5, 1.0, 1.0, 1.0] or wrong or any(len(s["norms"]) != 2 * seen["layers"] for s in seen["steps"]):
        problems.append(f"{mode}: LNS scales off the ramp: alphas {alphas}, wrong {wrong[:3]}")
    if mode == "lora" and not (seen["rebuilds"] and seen["load_calls"] == 2 and seen["final_whole"]):
        problems.append(f"lora: the merged export was not rebuilt from base + adapter: {seen['rebuilds']}, "
                        f"{seen['load_calls']} loads, whole {seen['final_whole']}")
    if mode == "full":
        saved, expected = load_file(sharded / mode / "model.safetensors"), load_file(single / mode / "model.safetensors")
        missing = sorted(set(expected) - set(saved))
        worst = max(float((saved[k].float() - t.float()).abs().max()) for k, t in expected.items() if k in saved)
        checks["full_state_dict_max_abs_diff"] = worst
        if missing or worst > 3e-4:
            problems.append(f"full: saved weights differ from the unlaunched run's: missing {missing}, max diff {worst:.3g}")
fresh = subprocess.run([sys.executable, "-c", textwrap.dedent(f"""
    import sys, json, torch
    sys.modules["lns_surgery"] = None  # the checkpoint's own code must be enough
    from transformers import AutoModelForCausalLM
    ids = torch.arange(1, 41).unsqueeze(0).cuda()
    out = {{}}
    for mode in ("full", "lora"):
        logits = []
        for folder in ({str(sharded)!r}, {str(single)!r}):
            model = AutoModelForCausalLM.from_pretrained(folder + "/" + mode, trust_remote_code=True).cuda().eval()
            with torch.no_grad():
                logits.append(model(ids).logits.float())
        out[mode] = {{"module": type(model).__module__, "alpha": model.config.lns["alpha"],
                      "max_abs_diff": float((logits[0] - logits[1]).abs().max())}}
    print(json.dumps(out))
""")], capture_output=True, text=True)
loaded = json.loads(fresh.stdout.strip().splitlines()[-1]) if fresh.returncode == 0 else {"error": fresh.stderr[-2000:]}
checks["fresh_process_load"] = loaded
for mode in ("full", "lora"):
    entry = loaded.get(mode, {})
    if not str(entry.get("module", "")).startswith("transformers_modules") or entry.get("alpha") != 1.0:
        problems.append(f"{mode}: a fresh process could not load the sharded run's output with its own code: {loaded}")
    elif not entry["max_abs_diff"] < 1e-3:
        problems.append(f"{mode}: logits differ from the unlaunched run's by {entry['max_abs_diff']:.3g}")
checks["problems"] = problems
(record_dir / "checks.json").write_text(json.dumps(checks, indent=2) + "\n")
print(json.dumps(checks, indent=2))
sys.exit(1 if problems else 0)
PY
}

sharded_stage() {  # sharded_stage LAUNCHER: launched with recipes/accelerate/LAUNCHER.yaml on one GPU, and unlaunched
    local launcher="$1"
    if [ "$launcher" = zero3 ] && ! "$PYTHON" -c "import deepspeed" >/dev/null 2>&1; then
        echo "deepspeed is not installed"
        return "$SKIPPED"
    fi
    sharded_prepare && sharded_write_run || return 1
    mkdir -p "$OUT_DIR/$launcher" || return 1
    # fp32 (mixed_precision no) so that the two runs can be compared closely
    "$PYTHON" -m accelerate.commands.launch --config_file "recipes/accelerate/$launcher.yaml" --num_processes 1 \
        --mixed_precision no --main_process_port 0 "$WORK/sharded_run.py" "$launcher" "$WORK/$launcher/sharded" \
        || return 1
    "$PYTHON" "$WORK/sharded_run.py" none "$WORK/$launcher/single" || return 1
    sharded_check "$launcher" "$OUT_DIR/$launcher" "$WORK/$launcher/sharded" "$WORK/$launcher/single"
}
export -f sharded_prepare sharded_write_run sharded_check sharded_stage
export SKIPPED
run_stage fsdp "$FSDP_LIMIT" bash -c 'sharded_stage fsdp'
run_stage zero3 "$ZERO3_LIMIT" bash -c 'sharded_stage zero3'

# --- summary ------------------------------------------------------------------------------------
{
    echo "{"
    echo "  \"gpu\": \"$(nvidia-smi --query-gpu=name --format=csv,noheader | head -n 1)\","
    echo "  \"torch\": \"$CUDA_REPORT\","
    echo "  \"seconds\": $SECONDS,"
    echo "  \"stages\": ["
    last=$((${#STAGES[@]} - 1))
    for i in "${!STAGES[@]}"; do
        if [ "$i" -lt "$last" ]; then echo "    ${STAGES[$i]},"; else echo "    ${STAGES[$i]}"; fi
    done
    echo "  ]"
    echo "}"
} >"$OUT_DIR/summary.json"
echo "gpu_check: $([ $FAILED = 0 ] && echo "all stages passed" || echo "some stages FAILED") in ${SECONDS}s; $OUT_DIR/summary.json"
exit $FAILED
