#!/usr/bin/env bash
# GPU check: the benchmarks' GPU figures and a short bf16 SFT of a 0.5B-shaped LNS model, in under
# 8 minutes on one H100/H200-class GPU. Needs no network: the SFT model has random weights with
# Qwen2.5-0.5B's shapes, and its data and tokenizer are generated here.
#
#     bash scripts/gpu_check.sh [OUT_DIR]        # default OUT_DIR: gpu_results
#
# Stages (each under its own time limit, so the whole run stays under 8 minutes; a stage that fails
# or times out is reported and the others still run):
#   1. sft           random Qwen2.5-0.5B-shaped model, converted to LNS on load by recipes/alpaca.yaml,
#                    LoRA SFT in bf16 on synthetic Alpaca records (sums, word reversal, next weekday);
#                    then checks: the merged export is an LNS checkpoint, its held-out loss fell, and a
#                    fresh process loads it with trust_remote_code on the GPU and gets finite logits
#   2. bench_train   scripts/bench_train.py --gpu (LNS step-time overhead, packing vs padding, MFU)
#   3. bench_convert scripts/bench_convert.py (conversion vs cp; disk-bound, no GPU mode)
#   4. bench_analyze scripts/bench_analyze.py (layer-removal sweep cost; it has no device option, so
#                    this is the machine's CPU figure)
# Writes into OUT_DIR: summary.json (status and seconds per stage), logs/<stage>.log, sft/ (metrics.json,
# checks.json), bench_train.json, bench_convert.json, bench_analyze.json. Exit status: 0 when every
# stage passed, 1 when one failed or timed out, 2 when there is no usable GPU (checked first, in seconds).

set -uo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT_DIR="${1:-gpu_results}"
PYTHON="${PYTHON:-python}"
# seconds per stage: 120 + 180 + 120 + 60 = 480 s at most
SFT_LIMIT="${SFT_LIMIT:-120}"
TRAIN_LIMIT="${TRAIN_LIMIT:-180}"
CONVERT_LIMIT="${CONVERT_LIMIT:-120}"
ANALYZE_LIMIT="${ANALYZE_LIMIT:-60}"

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
    local start=$SECONDS status
    echo "== $name (limit ${limit}s)"
    timeout --kill-after=10 "$limit" "$@" >"$OUT_DIR/logs/$name.log" 2>&1
    local code=$?
    case $code in
        0) status=passed ;;
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
