"""The study scripts end to end with tiny step counts: the healing study (two arms x two seeds on stories260K),
SFT after healing (a stock and an LNS model), the from-scratch reproduction (Pre-LN vs LNS) and the GPU
check's refusal on a machine without a GPU."""

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


def healing_study_module():
    """scripts/healing_study.py imported as a module, for its pure functions."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("healing_study", REPO_ROOT / "scripts" / "healing_study.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_healing_study_end_to_end(stories_path, tmp_path):
    data = small_c4(tmp_path, 20)
    out = tmp_path / "healing"
    result = run_script("scripts/healing_study.py", "--model", str(stories_path), "--data", str(data), "--steps", "2",
                        "--eval-every", "1", "--batch-size", "4", "--seq-len", "64", "--eval-fraction", "0.15",
                        "--analysis-tokens", "512", "--arms", "lns-distill-frozen,stock", "--seeds", "3,4",
                        "--threads", "1", "--cpu", "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    no_leftovers(out)

    results = json.loads((out / "results.json").read_text())
    assert results["settings"]["arms"] == ["stock", "lns-distill-frozen"]  # the study's own order
    assert results["settings"]["seeds"] == [3, 4]
    runs, arms = results["runs"], results["arms"]
    assert list(arms) == ["stock", "lns-distill-frozen"] and all(list(runs[arm]) == ["3", "4"] for arm in arms)
    # within a seed every arm saw the same tokens: 2 steps x 4 sequences x 64 tokens, less the padding of
    # the corpus's last packed row if the seed's order drew it
    assert set(results["tokens_by_seed"]) == {"3", "4"}
    for seed, count in results["tokens_by_seed"].items():
        assert 2 * 4 * 64 - 64 < count <= 2 * 4 * 64
        assert {runs[arm][seed]["tokens_seen"] for arm in arms} == {count}
    assert results["tokens_per_arm"] == max(results["tokens_by_seed"].values())
    for arm, by_seed in runs.items():
        for seed, run in by_seed.items():
            assert [p["step"] for p in run["eval_curve"]] == [0, 1, 2], (arm, seed)
            assert [p["tokens"] for p in run["eval_curve"]] == [0, 256, 512]
            assert all_finite([p["eval_perplexity"] for p in run["eval_curve"]])
            assert (out / "runs" / arm / f"seed-{seed}" / "metrics.json").is_file()
            assert (out / "runs" / arm / f"seed-{seed}" / "recipe.yaml").is_file()
    stock, frozen = runs["stock"], runs["lns-distill-frozen"]
    # step 0: every seed evaluates the same held-out split; the distillation arm's perplexity is its LM
    # loss (not the KL it trains on), which the conversion raised well above the base's
    for by_seed in (stock, frozen):
        assert by_seed["3"]["eval_curve"][0]["eval_loss"] == pytest.approx(by_seed["4"]["eval_curve"][0]["eval_loss"], rel=1e-6)
    assert frozen["3"]["eval_curve"][0]["eval_loss"] > stock["3"]["eval_curve"][0]["eval_loss"] + 0.5
    assert results["base_eval_perplexity"] == pytest.approx(stock["3"]["eval_curve"][0]["eval_perplexity"])
    assert results["converted_eval_perplexity"] == pytest.approx(frozen["3"]["eval_curve"][0]["eval_perplexity"])
    # the seeds ordered the training data differently, so the trained models differ
    assert stock["3"]["final_eval_loss"] != stock["4"]["final_eval_loss"]
    # distillation from the source moved the converted model back towards it
    assert all(run["final_eval_loss"] < run["eval_curve"][0]["eval_loss"] for run in frozen.values())

    # aggregates over seeds are the per-seed numbers' mean, min and max
    finals = [frozen[seed]["final_eval_perplexity"] for seed in ("3", "4")]
    assert arms["lns-distill-frozen"]["final_eval_perplexity"]["mean"] == pytest.approx(sum(finals) / 2)
    assert arms["lns-distill-frozen"]["final_eval_perplexity"]["min"] == pytest.approx(min(finals))
    vs_stock = [100 * (frozen[s]["final_eval_perplexity"] / stock[s]["final_eval_perplexity"] - 1) for s in ("3", "4")]
    assert arms["lns-distill-frozen"]["final_vs_stock_percent"]["mean"] == pytest.approx(sum(vs_stock) / 2)
    assert arms["stock"]["final_vs_stock_percent"] is None and arms["stock"]["recovery_tokens"] is None
    recovery = arms["lns-distill-frozen"]["recovery_tokens"]
    assert set(recovery) == {"90%", "99%"}
    for level, share in (("90%", 0.9), ("99%", 0.99)):
        target = results["converted_eval_perplexity"] - share * (results["converted_eval_perplexity"] - results["base_eval_perplexity"])
        for seed, reached in zip(("3", "4"), recovery[level]["per_seed"]):
            first = next((p["tokens"] for p in frozen[seed]["eval_curve"] if p["eval_perplexity"] <= target), "not reached")
            assert reached == first, (level, seed)

    # frozen norms keep the scaling exactly; a stock model has no effective scales
    scales = arms["lns-distill-frozen"]["effective_scales"]
    assert arms["stock"]["effective_scales"] is None
    assert scales["nominal"] == pytest.approx([1 / math.sqrt(block) for block in range(1, 6)], rel=1e-12)
    for norm in ("input_layernorm", "post_attention_layernorm"):
        assert scales["per_block_mean"][norm] == pytest.approx(scales["nominal"], rel=1e-6)
        assert scales["ratio_mean"][norm]["mean"] == pytest.approx(1.0, rel=1e-6)
        assert scales["undone_fraction"][norm]["max"] == 0.0
    # before / after depth numbers: the middle third of 5 blocks is blocks 2-3
    before = results["depth_before"]
    assert list(before) == ["base (untouched)", "converted (step 0)"]
    assert before["base (untouched)"]["effective_scales"] is None
    assert before["converted (step 0)"]["effective_scales"]["ratio_mean"]["input_layernorm"] == pytest.approx(1.0)
    for entry in list(before.values()) + [run["depth"] for by_seed in runs.values() for run in by_seed.values()]:
        assert entry["middle_removal_loss_increase"] == pytest.approx(sum(entry["removal_loss_increase"][1:3]) / 2)
        assert entry["last_output_variance"] == entry["output_variance"][-1] and len(entry["output_variance"]) == 5
    assert arms["stock"]["middle_removal_loss_increase"]["n"] == 2

    verdict = results["verdict"]
    assert verdict["distill_vs_stock"] in ("beat", "lost to", "matched (within the seed spread)")
    assert verdict["undo"].startswith("No norms-trained LNS arm ran")
    summary = (out / "summary.md").read_text()
    assert verdict["headline"] in summary and verdict["recovery"] in summary
    assert "| lns-distill-frozen | 1.000 | 0.000 | 0.00 | 1.000 | 0.000 | 0.00 |" in summary
    assert_png(out / "eval_perplexity.png")
    assert_png(out / "effective_scales.png")
    assert (out / "depth" / "report.json").is_file()
    assert_png(out / "depth" / "removal.png")


def test_healing_study_summaries():
    study = healing_study_module()
    assert list(study.middle_blocks(5)) == [1, 2] and list(study.middle_blocks(30)) == list(range(10, 20))
    assert list(study.middle_blocks(2)) == [0]
    # a block whose norm learned w -> sqrt(l) * w is fully undone; one that kept w is not
    layers = [{"lns_scale": 1 / math.sqrt(block), "effective_scale": {"norm": value}}
              for block, value in ((1, 1.0), (2, 1.0), (3, 1 / math.sqrt(3)), (4, 0.75))]
    summary = study.effective_summary(layers)
    assert summary["ratio_mean"]["norm"] == pytest.approx((math.sqrt(2) + 1 + 1.5) / 3)
    assert summary["undone_fraction"]["norm"] == pytest.approx(1 / 3)
    assert summary["undone_share"]["norm"] == pytest.approx((1 + 0 + 0.5) / 3)
    curve = [{"tokens": 0, "eval_perplexity": 100.0, "lns_alpha": 1.0},
             {"tokens": 10, "eval_perplexity": 18.0, "lns_alpha": 1.0},
             {"tokens": 20, "eval_perplexity": 10.5, "lns_alpha": 1.0}]
    # jump 100 -> 10: 90% recovered at or below 19, 99% at or below 10.9
    assert study.recovery_tokens(curve, 10.0, 100.0) == {"90%": 10, "99%": 20}
    assert study.recovery_tokens(curve[:2], 10.0, 100.0) == {"90%": 10, "99%": "not reached"}
    ramp = [{**point, "lns_alpha": 0.5 if point["tokens"] < 20 else 1.0} for point in curve]
    assert study.recovery_tokens(ramp, 10.0, 100.0) == {"90%": 20, "99%": 20}  # only full-LNS evaluations count
    assert study.recovery_tokens(curve, None, 100.0) == {"90%": None, "99%": None}
    assert study.spread([1.0, 3.0]) == {"mean": 2.0, "std": pytest.approx(math.sqrt(2)), "min": 1.0, "max": 3.0, "n": 2}


@pytest.mark.parametrize("options, message", [
    (["--ramp-steps", "9"], "error: --ramp-steps must be between 1 and --steps (4), so that the ramp arm ends at full LNS"),
    (["--arms", "stock,lns-nothing"], "error: --arms takes distinct names from stock, lns-lm, lns-lm-frozen, lns-distill, "
                                      "lns-distill-frozen, lns-ramp; got 'stock,lns-nothing'"),
    (["--seeds", "0,0"], "error: --seeds needs at least one value and no repeats, got '0,0'"),
    (["--seeds", "a"], "error: --seeds takes comma-separated integers, got 'a'"),
])
def test_healing_study_refuses_bad_settings(stories_path, tmp_path, options, message):
    out = tmp_path / "healing"
    result = run_script("scripts/healing_study.py", "--model", str(stories_path), "--data", "unused.jsonl", "--steps", "4",
                        *options, "--out", str(out))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [message]
    assert not out.exists()


@pytest.mark.slow
def test_sft_after_healing_end_to_end(stories_path, tmp_path):
    from lns_surgery import convert

    lns = tmp_path / "stories-lns"
    convert(stories_path, lns)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text((REPO_ROOT / "recipes" / "cpu" / "sft-alpaca-tiny.yaml").read_text(encoding="utf-8").replace(
        "../shared/data/alpaca/alpaca_first100.json", str(shared_path("data/alpaca/alpaca_first100.json"))), encoding="utf-8")
    out = tmp_path / "sft"
    result = run_script("scripts/sft_after_healing.py", "--model", f"stock base={stories_path}", "--model", f"lns={lns}",
                        "--recipe", str(recipe), "--max-steps", "3", "--threads", "1", "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    no_leftovers(out)

    results = json.loads((out / "results.json").read_text())
    stock, converted = results["models"]["stock base"], results["models"]["lns"]
    assert (stock["lns"], converted["lns"]) == ("stock", "lns")  # the stock model was not converted on load
    for row in (stock, converted):
        assert row["evaluated_at_steps"] == [0, 3]  # before and after only, each once
        assert row["eval_loss_after"] < row["eval_loss_before"]
        assert row["train_tokens"] > 0
    assert stock["after_vs_stock"] == 0.0
    assert converted["after_vs_stock"] == pytest.approx(converted["eval_loss_after"] - stock["eval_loss_after"])
    # LNS on a trained model without healing starts far from it: 3 steps of LoRA do not close the gap
    assert converted["eval_loss_before"] > stock["eval_loss_before"]
    assert "| lns | lns |" in (out / "summary.md").read_text()
    assert not (lns / "adapter_config.json").exists()  # the adapters went to a scratch folder, not the input


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
    bare = subprocess.run([bash, script, str(out / "bare")], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PATH": str(tmp_path / "empty-bin") + os.pathsep + "/usr/bin:/bin"})
    # nvidia-smi present (a stub) but torch without CUDA
    stub = tmp_path / "bin" / "nvidia-smi"
    stub.parent.mkdir()
    stub.write_text("#!/bin/sh\necho 'GPU 0: stub'\n")
    stub.chmod(0o755)
    no_cuda = subprocess.run([bash, script, str(out / "no-cuda")], capture_output=True, text=True, timeout=120,
                             env={**os.environ, "PATH": str(stub.parent) + os.pathsep + os.environ["PATH"],
                                  "PYTHON": sys.executable})
    for result, reason, folder in ((bare, "nvidia-smi not found", "bare"), (no_cuda, "cannot use the GPU", "no-cuda")):
        assert result.returncode == 2, result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("gpu_check: ") and reason in lines[0]
        # what comes back from a lent machine says why: the summary records the failed setup, and no stage ran
        summary = json.loads((out / folder / "summary.json").read_text())
        assert [stage["stage"] for stage in summary["stages"]] == ["setup"] and not summary["finished"]
        assert summary["stages"][0]["status"].startswith("failed: gpu_check: ") and reason in summary["stages"][0]["status"]
