#!/usr/bin/env bash
# GPU check: LNS exactness in bf16, a short bf16 SFT of a 0.5B-shaped LNS model through the shipped
# recipe, training throughput (tokens/s, MFU, peak memory, LNS and distillation overheads), and
# single-GPU FSDP2 and ZeRO-3 runs, on one H100/H200-class GPU, in one command of at most 7 minutes.
# Needs no network: the models have random weights with the shapes of Qwen2.5-0.5B and SmolLM2-135M,
# and their data and tokenizers are generated here.
#
#     bash scripts/gpu_check.sh [OUT_DIR]                       # default OUT_DIR: gpu_results
#     GPU_CHECK_STAGES="fsdp zero3" bash scripts/gpu_check.sh   # only the named stages
#     bash scripts/gpu_check.sh --dry-run OUT_DIR               # (or GPU_CHECK_DRY=1) every stage on the
#                                                               # CPU, tiny, with 4x the time: tests/test_gpu_check.py
#
# On a machine without a package index: first, where there is one, `python3 scripts/prepare_gpu_wheels.py`
# fills .whl/ (git ignores it) with trl, datasets, dill and multiprocess for Python 3.12; bring .whl/ with
# the working tree. This script installs the wheels whose package the machine lacks, offline, into a
# throw-away folder.
#
# Stages (python3 scripts/gpu_check_stages.py STAGE does the work; each one must end by its point in a
# fixed schedule, so time a stage leaves unused goes to the next ones and the whole stays within
# GPU_CHECK_BUDGET, 420 s):
#   setup      install .whl/, import everything, record the versions (and unmet requirements)     25 s
#   exactness  bf16 LNS vs the hook-based reference of tests/lns_reference.py, SmolLM2-135M-shaped:
#              eager, sdpa, flex_attention, torch.compile                                          90 s
#   sft        recipes/alpaca.yaml (LoRA, converted on load) on a Qwen2.5-0.5B-shaped model, 40 steps;
#              the held-out loss falls, a fresh process runs the merged export with its own code;
#              the run's own tokens/s, MFU and peak memory                                          80 s
#   train      Qwen2.5-0.5B- and SmolLM2-135M-shaped: full and LoRA tokens/s, MFU (6 x params x tokens
#              against 989 TFLOP/s on H100/H200), peak memory, LNS/stock and distillation/plain step
#              time (scripts/bench_train.py's measurements)                                        95 s
#   fsdp       recipes/accelerate/fsdp.yaml on one GPU: sharded for real, the LNS ramp, the saved
#              weights and logits equal an unlaunched run's (scripts/sharded_rank.py)              75 s
#   zero3      the same through recipes/accelerate/zero3.yaml ("skipped" without deepspeed)         50 s
# Writes into OUT_DIR (7 files at most): summary.json (rewritten after every stage: status, seconds and
# key figures of each), gpu_check.log (all output), and <stage>.json per stage. Prints the key figures at
# the end. Exit status: 0 when every stage passed or was skipped, 1 when one failed or ran out of time,
# 2 when the setup failed (no GPU, or a package missing: one line says which and what to do).

set -uo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DRY="${GPU_CHECK_DRY:-0}"
if [ "${1:-}" = --dry-run ]; then
    DRY=1
    shift
fi
OUT_DIR="${1:-gpu_results}"
PYTHON="${PYTHON:-python3}"
WHEELS="${GPU_CHECK_WHEELS:-$REPO/.whl}"
# a dry run on a shared CPU has 4 times the time: it checks that the stages work, not how fast they are
STRETCH=$([ "$DRY" = 1 ] && echo 4 || echo 1)
BUDGET="${GPU_CHECK_BUDGET:-$((420 * STRETCH))}"
GPU_CHECK_STAGES="${GPU_CHECK_STAGES:-exactness sft train fsdp zero3}"
SKIPPED=77  # a stage's exit status for "cannot run here" (zero3 without deepspeed)
# Each stage's share of the budget; the last 5 s are for the summary and the report.
declare -A SHARE=([setup]=25 [exactness]=90 [sft]=80 [train]=95 [fsdp]=75 [zero3]=50)
ORDER=(setup exactness sft train fsdp zero3)
STAGES_PY="$REPO/scripts/gpu_check_stages.py"

mkdir -p "$OUT_DIR" || exit 2
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
LOG="$OUT_DIR/gpu_check.log"
for name in summary gpu_check.log "${ORDER[@]}"; do  # this run's files only, whatever a previous run left
    rm -f "$OUT_DIR/$name.json" "$OUT_DIR/$name"
done
: >"$LOG"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/lns-gpu-check.XXXXXX")" || exit 2
trap 'rm -rf "$WORK"' EXIT
cd "$REPO" || exit 2
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"   # works without `pip install -e .` too
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export HF_HUB_DISABLE_TELEMETRY=1 PYTHONUNBUFFERED=1 GPU_CHECK_DRY="$DRY"
export HF_HOME="$WORK/hf" HF_MODULES_CACHE="$WORK/hf-modules"  # the remote code of the exports stays here

say() { echo "$*" | tee -a "$LOG"; }

# seconds into the run by which stage NAME must be done: the sum of the shares up to it
deadline() {
    local total=0 stage
    for stage in "${ORDER[@]}"; do
        total=$((total + SHARE[$stage] * STRETCH))
        [ "$stage" = "$1" ] && break
    done
    [ "$total" -gt "$((BUDGET - 5))" ] && total=$((BUDGET - 5))
    echo "$total"
}

summary() {  # summary STAGE STATUS SECONDS LIMIT: into summary.json, with the seconds so far
    "$PYTHON" "$STAGES_PY" summary "$OUT_DIR" "$@" "$SECONDS" >>"$LOG" 2>&1
}

# --- setup: wheels, imports, GPU ----------------------------------------------------------------
setup() {
    if [ "$DRY" != 1 ]; then
        command -v nvidia-smi >/dev/null 2>&1 \
            || { echo "gpu_check: no NVIDIA GPU here (nvidia-smi not found); --dry-run runs the stages on the CPU"; return 2; }
        nvidia-smi -L >/dev/null 2>&1 \
            || { echo "gpu_check: nvidia-smi cannot list a GPU: $(nvidia-smi -L 2>&1 | head -n 1)"; return 2; }
    fi
    if compgen -G "$WHEELS/*.whl" >/dev/null; then
        local missing
        mapfile -t missing < <("$PYTHON" "$STAGES_PY" wheels "$WHEELS")
        if [ "${#missing[@]}" -gt 0 ]; then
            echo "installing ${missing[*]##*/} offline into $WORK/site"
            "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$WORK/site" \
                "${missing[@]}" >>"$LOG" 2>&1 \
                || { echo "gpu_check: the wheels in $WHEELS did not install (see $LOG); run \`python3 scripts/prepare_gpu_wheels.py\` again"; return 2; }
        fi
    fi
    return 0
}
START_SETUP=$SECONDS
echo "== setup" >>"$LOG"
SETUP_ERROR="$(setup 2>&1)"
CODE=$?
[ -n "$SETUP_ERROR" ] && echo "$SETUP_ERROR" >>"$LOG"
[ -d "$WORK/site" ] && export PYTHONPATH="$WORK/site:$PYTHONPATH"
if [ $CODE = 0 ]; then
    # one line on stderr when an import fails; the versions and any unmet requirement go to the log
    LEFT=$(($(deadline setup) - SECONDS - 5))
    SETUP_ERROR="$(timeout --kill-after=5 "$((LEFT > 5 ? LEFT : 5))" "$PYTHON" "$STAGES_PY" setup "$OUT_DIR" 2>&1 >>"$LOG")"
    CODE=$?
    [ -n "$SETUP_ERROR" ] && echo "$SETUP_ERROR" >>"$LOG"
fi
if [ $CODE != 0 ]; then
    case $CODE in 124 | 137) SETUP_ERROR="gpu_check: the imports took longer than the setup's share ($(deadline setup) s)" ;; esac
    echo "$SETUP_ERROR" | tail -n 1 >&2
    summary setup "failed: $(echo "$SETUP_ERROR" | tail -n 1)" "$((SECONDS - START_SETUP))" "$(deadline setup)"
    exit 2
fi
summary setup passed "$((SECONDS - START_SETUP))" "$(deadline setup)"
say "gpu_check: $([ "$DRY" = 1 ] && echo "dry run on the CPU" || nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | head -n 1); writing $OUT_DIR"

# --- the stages ---------------------------------------------------------------------------------
FAILED=0
run_stage() {  # run_stage NAME COMMAND...
    local name="$1"
    shift
    case " $GPU_CHECK_STAGES " in *" $name "*) ;; *) return 0 ;; esac
    local start=$SECONDS limit status
    limit=$(($(deadline "$name") - SECONDS))
    if [ "$limit" -lt 10 ]; then
        say "== $name: not run, out of time"
        summary "$name" "timeout: not started" 0 "$limit"
        FAILED=1
        return 0
    fi
    say "== $name (limit ${limit}s)"
    local offset
    offset=$(($(stat -c %s "$LOG") + 1))
    timeout --kill-after=5 "$((limit - 5))" "$@" >>"$LOG" 2>&1
    local code=$?
    case $code in
        0) status=passed ;;
        "$SKIPPED") status="skipped: $(tail -n 1 "$LOG")" ;;
        124 | 137) status=timeout; FAILED=1 ;;
        *) status="failed (exit $code)"; FAILED=1 ;;
    esac
    local seconds=$((SECONDS - start)) last=""
    [ "$status" = passed ] || last="$(tail -c "+$offset" "$LOG" | grep -v '^\s*$' | tail -n 6 | sed 's/^/   | /')"
    say "   $status in ${seconds}s"
    [ -z "$last" ] || echo "$last"
    summary "$name" "$status" "$seconds" "$limit"
}

run_stage exactness "$PYTHON" "$STAGES_PY" exactness "$OUT_DIR"
run_stage sft "$PYTHON" "$STAGES_PY" sft "$OUT_DIR" "$WORK"
run_stage train "$PYTHON" "$STAGES_PY" train "$OUT_DIR"
run_stage fsdp "$PYTHON" "$STAGES_PY" fsdp "$OUT_DIR" "$WORK"
run_stage zero3 "$PYTHON" "$STAGES_PY" zero3 "$OUT_DIR" "$WORK"

# --- the figures --------------------------------------------------------------------------------
"$PYTHON" "$STAGES_PY" finish "$OUT_DIR" "$([ $FAILED = 0 ] && echo passed || echo failed)" "$SECONDS" >>"$LOG" 2>&1
"$PYTHON" "$STAGES_PY" report "$OUT_DIR" | tee -a "$LOG"
say "gpu_check: $([ $FAILED = 0 ] && echo "every stage passed or was skipped" || echo "some stages FAILED") in ${SECONDS}s; $OUT_DIR/summary.json"
exit $FAILED
