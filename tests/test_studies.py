"""The study scripts end to end with tiny step counts: the healing study (three arms on stories260K),
the from-scratch reproduction (Pre-LN vs LNS) and the GPU check's refusal on a machine without a GPU."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO_ROOT, SHARED, shared_path

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def run_script(*args: str, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=REPO_ROOT, capture_output=True, text=True, stdin=subprocess.DEVNULL,
                          timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def small_c4(tmp_path: Path, documents: int) -> Path:
    """The first documents of the shared C4 sample (a shorter file tokenises and evaluates faster)."""
    lines = shared_path("data/c4-sample/c4_sample300.jsonl").read_text(encoding="utf-8").splitlines()[:documents]
    path = tmp_path / "c4-small.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def assert_png(path: Path) -> None:
    assert path.is_file() and path.stat().st_size > 1000
    assert path.read_bytes()[:8] == PNG_MAGIC


def all_finite(values) -> bool:
    return all(isinstance(v, (int, float)) and math.isfinite(v) for v in values)


def no_leftovers(out: Path) -> None:
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")], "a staging folder was left behind"


@pytest.mark.slow
def test_healing_study_end_to_end(stories_path, tmp_path):
    data = small_c4(tmp_path, 60)
    out = tmp_path / "healing"
    result = run_script("scripts/healing_study.py", "--model", str(stories_path), "--data", str(data), "--steps", "4",
                        "--eval-every", "2", "--ramp-steps", "2", "--batch-size", "4", "--seq-len", "64",
                        "--analysis-tokens", "512", "--threads", "1", "--cpu", "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    no_leftovers(out)

    results = json.loads((out / "results.json").read_text())
    arms = results["arms"]
    assert list(arms) == ["stock", "lns-immediate", "lns-ramp"]
    for arm, entry in arms.items():
        assert [p["step"] for p in entry["eval_curve"]] == [0, 2, 4], arm
        assert all_finite([p["eval_perplexity"] for p in entry["eval_curve"]] + [entry["final_eval_perplexity"]])
        assert (out / "runs" / arm / "metrics.json").is_file() and (out / "runs" / arm / "recipe.yaml").is_file()
    # the same tokens for every arm
    assert {entry["tokens_seen"] for entry in arms.values()} == {results["tokens_per_arm"]} and results["tokens_per_arm"] > 0
    stock, immediate, ramp = (arms[a]["eval_curve"] for a in ("stock", "lns-immediate", "lns-ramp"))
    # step 0: the ramp starts from the original function, the immediate switch does not
    assert ramp[0]["lns_alpha"] == 0.0 and math.isclose(ramp[0]["eval_loss"], stock[0]["eval_loss"], rel_tol=1e-5)
    assert immediate[0]["eval_loss"] > stock[0]["eval_loss"] + 0.1
    assert ramp[-1]["lns_alpha"] == 1.0 and arms["lns-ramp"]["final_lns_alpha"] == 1.0
    # training lowered the loss of the stock and the converted model; the ramped model ends at full LNS
    # better than the converted model started
    assert arms["stock"]["final_eval_loss"] < stock[0]["eval_loss"]
    assert arms["lns-immediate"]["final_eval_loss"] < immediate[0]["eval_loss"]
    assert arms["lns-ramp"]["final_eval_loss"] < immediate[0]["eval_loss"]

    depth = results["depth"]
    assert list(depth) == ["base (untouched)", "stock", "lns-immediate", "lns-ramp"]
    for name, entry in depth.items():
        assert len(entry["removal_loss_increase"]) == 5, name  # stories260K has 5 blocks
        assert all_finite(entry["removal_loss_increase"] + entry["output_variance"] + entry["angular_distance_next"])
    assert depth["base (untouched)"]["status"] == "stock" and depth["lns-ramp"]["status"] == "lns"

    verdict = results["verdict"]
    assert verdict["ranking"][0] == verdict["best"] and sorted(verdict["ranking"]) == sorted(arms)
    summary = (out / "summary.md").read_text()
    assert verdict["headline"] in summary and "came out ahead" in summary
    assert_png(out / "eval_perplexity.png")
    assert (out / "depth" / "report.json").is_file()
    assert_png(out / "depth" / "removal.png")


def test_healing_study_refuses_bad_settings(stories_path, tmp_path):
    out = tmp_path / "healing"
    result = run_script("scripts/healing_study.py", "--model", str(stories_path), "--data", "unused.jsonl", "--steps", "4",
                        "--ramp-steps", "9", "--out", str(out))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: --ramp-steps must be between 1 and --steps (4), so that the ramp arm ends at full LNS"]
    assert not out.exists()


@pytest.mark.slow
def test_reproduce_paper_tiny_end_to_end(tmp_path):
    shared_path("models/stories260K")
    shared_path("data/c4-sample/c4_sample300.jsonl")
    out = tmp_path / "reproduce"
    result = run_script("scripts/reproduce_paper.py", "--preset", "tiny", "--steps", "2", "--threads", "1",
                        "--out", str(out), env={"LNS_SHARED_DIR": str(SHARED)})
    assert result.returncode == 0, result.stderr[-3000:]
    no_leftovers(out)

    results = json.loads((out / "results.json").read_text())
    assert results["model"]["num_hidden_layers"] == 12 and results["model"]["initializer_range"] == 0.02
    arms = results["arms"]
    assert list(arms) == ["pre-ln", "lns"]
    assert arms["pre-ln"]["tokens_seen"] == arms["lns"]["tokens_seen"] == results["tokens_per_arm"] == 2 * 8 * 256
    for arm, entry in arms.items():
        assert all_finite([p["eval_perplexity"] for p in entry["eval_curve"]] + [entry["final_eval_perplexity"]]), arm
        # the variance callback measured at the start and after every step (every max(1, 2 // 20) = 1 steps)
        history = entry["variance_history"]
        assert [point["step"] for point in history] == [0, 1, 2], arm
        assert all(len(point["output_variance"]) == 12 and all_finite(point["output_variance"]) for point in history)
    # same initial weights, so the embeddings' variance is the same at step 0 and only the scaled blocks differ
    pre, lns = arms["pre-ln"]["variance_history"][0], arms["lns"]["variance_history"][0]
    assert math.isclose(pre["embedding_variance"], lns["embedding_variance"], rel_tol=1e-6)
    assert pre["output_variance"][0] == pytest.approx(lns["output_variance"][0], rel=1e-5)  # block 1: scale 1
    assert lns["output_variance"][-1] < pre["output_variance"][-1]  # deeper blocks add less with 1/sqrt(l)

    for name in ("pre-ln", "lns"):
        entry = results["depth"][name]
        assert len(entry["angular_distance"]) == 12 and all_finite(entry["removal_loss_increase"])
    comparison = results["comparison"]["perplexity"]
    assert comparison["paper_lns_vs_pre_ln_percent"] == pytest.approx(100 * (25.76 / 26.73 - 1))
    summary = (out / "summary.md").read_text()
    assert "26.73" in summary and "25.76" in summary and f"{comparison['lns']:.2f}" in summary
    assert_png(out / "eval_perplexity.png")
    assert_png(out / "variance_through_training.png")
    assert_png(out / "depth" / "variance.png")


def test_gpu_check_fails_fast_without_a_gpu(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the refusal cannot be shown here")
    out = tmp_path / "gpu"
    script = str(REPO_ROOT / "scripts" / "gpu_check.sh")
    bash = shutil.which("bash")
    # no nvidia-smi on PATH at all
    bare = subprocess.run([bash, script, str(out)], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PATH": str(tmp_path / "empty-bin") + os.pathsep + "/usr/bin:/bin"})
    # nvidia-smi present (a stub) but torch without CUDA
    stub = tmp_path / "bin" / "nvidia-smi"
    stub.parent.mkdir()
    stub.write_text("#!/bin/sh\necho 'GPU 0: stub'\n")
    stub.chmod(0o755)
    no_cuda = subprocess.run([bash, script, str(out)], capture_output=True, text=True, timeout=120,
                             env={**os.environ, "PATH": str(stub.parent) + os.pathsep + os.environ["PATH"],
                                  "PYTHON": sys.executable})
    for result, reason in ((bare, "nvidia-smi not found"), (no_cuda, "cannot use the GPU")):
        assert result.returncode == 2, result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("gpu_check: ") and reason in lines[0]
    assert not out.exists()
