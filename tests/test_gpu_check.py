"""scripts/gpu_check.sh: what it may do on a GPU machine without a package index, its one-line setup error,
and (slow) its dry run, which takes every stage through its code on the CPU so that the check cannot rot
between the runs on a real GPU."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO_ROOT

SCRIPT = REPO_ROOT / "scripts" / "gpu_check.sh"
STAGES = ["setup", "exactness", "sft", "train", "fsdp", "zero3"]
MAX_FILES = 8  # what comes back from the GPU machine


def _commands(text: str) -> list[str]:
    """The script's lines without comments (a `#` after a space starts one; "$#"-like uses do not occur)."""
    lines = []
    for line in text.splitlines():
        code = re.sub(r"(^|\s)#.*$", "", line)
        if code.strip():
            lines.append(code)
    return lines


def test_script_runs_python3_installs_offline_and_fits_seven_minutes():
    text = SCRIPT.read_text(encoding="utf-8")
    code = _commands(text)
    # the GPU machine has python3 and no `python`; $PYTHON overrides it
    bare = [line for line in code if re.search(r"(^|[\s;|&(`\"])python(\s|$)", line)]
    assert bare == []
    assert 'PYTHON="${PYTHON:-python3}"' in text
    # pip only installs from the carried wheels, never from an index
    installs = [line for line in code if "pip install" in line or "pip download" in line]
    assert installs and all("--no-index" in line and "pip install" in line for line in installs), installs
    # the stages' shares of the budget, plus 5 s for the summary, fit one 420 s command
    shares = dict(re.findall(r"\[(\w+)\]=(\d+)", re.search(r"declare -A SHARE=\((.*?)\)", text).group(1)))
    assert set(shares) == set(STAGES)
    assert sum(int(v) for v in shares.values()) + 5 <= 420
    assert re.search(r'BUDGET="\$\{GPU_CHECK_BUDGET:-\$\(\(420 \* STRETCH\)\)\}"', text)


def _run(out: Path, env_extra: dict, timeout: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable, "GPU_CHECK_DRY": "1", **env_extra}
    return subprocess.run(["bash", str(SCRIPT), str(out)], capture_output=True, text=True, env=env,
                          timeout=timeout, stdin=subprocess.DEVNULL)


def _files(out: Path) -> list[Path]:
    return [path for path in out.rglob("*") if path.is_file()]


def test_missing_trl_is_one_line_naming_the_preparation(tmp_path):
    # an import of trl that fails as it does on a machine without it
    stub = tmp_path / "stub" / "trl"
    stub.mkdir(parents=True)
    (stub / "__init__.py").write_text("raise ModuleNotFoundError(\"No module named 'trl'\", name='trl')\n")
    no_wheels = tmp_path / "no-wheels"
    no_wheels.mkdir()
    out = tmp_path / "out"
    done = _run(out, {"PYTHONPATH": str(stub.parent), "GPU_CHECK_WHEELS": str(no_wheels)}, timeout=300)

    assert done.returncode == 2, done.stdout[-2000:] + done.stderr[-2000:]
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, done.stderr
    assert "cannot import trl" in lines[0] and "python3 scripts/prepare_gpu_wheels.py" in lines[0]
    assert "pip install" not in lines[0]
    summary = json.loads((out / "summary.json").read_text())
    assert [(s["stage"], s["status"].split(":")[0]) for s in summary["stages"]] == [("setup", "failed")]
    assert "trl" in summary["environment"]["error"]
    assert len(_files(out)) <= MAX_FILES


@pytest.mark.slow
def test_dry_run_takes_every_stage_through_its_code(tmp_path):
    import importlib.util

    out = tmp_path / "out"
    done = _run(out, {}, timeout=1800)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    files = _files(out)
    assert len(files) <= MAX_FILES, files
    summary = json.loads((out / "summary.json").read_text())
    assert summary["mode"] == "dry" and summary["finished"] and summary["status"] == "passed"
    statuses = {s["stage"]: s["status"] for s in summary["stages"]}
    assert list(statuses) == STAGES
    has_deepspeed = importlib.util.find_spec("deepspeed") is not None
    for stage, status in statuses.items():
        if stage == "zero3" and not has_deepspeed:
            assert status == "skipped: deepspeed is not installed"
        else:
            assert status == "passed", (stage, status)

    # summary.json was rewritten after every stage, each time with the stages so far
    log = (out / "gpu_check.log").read_text()
    recorded = [line for line in log.splitlines() if line.startswith("summary.json: ")]
    assert [len(line.split(", ")) for line in recorded] == list(range(1, len(STAGES) + 1))

    figures = {s["stage"]: s.get("figures", {}) for s in summary["stages"]}
    for check in ("eager", "sdpa", "flex_attention", "compile"):
        entry = figures["exactness"][check]
        assert entry["passed"] and entry["change_vs_stock"] > 5 * entry["error_vs_fp32"], (check, entry)
    assert figures["sft"]["eval_loss_final"] < figures["sft"]["eval_loss_first"]
    assert figures["sft"]["fresh_process_load"]["finite"]
    for shape in ("qwen2.5-0.5b", "smollm2-135m"):
        train = figures["train"][shape]
        assert train["lns_over_stock_step"] > 0 and train["distill_over_plain_lora_step"] > 0
        assert train["full"]["tokens_per_second"] > 0 and train["lora"]["tokens_per_second"] > 0
    sharded = ["fsdp", "zero3"] if has_deepspeed else ["fsdp"]
    for stage in sharded:
        assert figures[stage]["full_sharded"] and figures[stage]["lora_sharded"]
        assert figures[stage]["full_scales_followed_ramp"] and figures[stage]["lora_scales_followed_ramp"]
    # the key figures are printed at the end
    assert "exactness  passed" in done.stdout and "qwen2.5-0.5b.full: step_s=" in done.stdout
