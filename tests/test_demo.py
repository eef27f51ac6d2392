"""`lns-surgery demo`: the whole job, end to end, on the shipped base model (a quick run, on CPU)."""

from __future__ import annotations

import json
import math

import pytest
from conftest import invoke_cli, run_cli

from lns_surgery.demo.pipeline import QUICK, DemoSettings


def _numbers(value, where=""):
    """Every number in a nested summary, with where it is."""
    if isinstance(value, bool):
        return
    if isinstance(value, (int, float)):
        yield where, value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _numbers(item, f"{where}.{key}")
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _numbers(item, f"{where}[{index}]")


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory):
    """One quick demo run through the command line, in a child process as a user would run it."""
    cwd = tmp_path_factory.mktemp("demo")
    result = run_cli("demo", "--quick", "--out", "demo-out", cwd=cwd, timeout=900)
    assert result.returncode == 0, f"stdout:\n{result.stdout[-3000:]}\nstderr:\n{result.stderr[-3000:]}"
    out = cwd / "demo-out"
    return out, json.loads((out / "summary.json").read_text(encoding="utf-8")), result


@pytest.mark.floor
@pytest.mark.slow
def test_every_stage_leaves_its_artefact(quick_demo):
    out, summary, _ = quick_demo
    for name in ("converted", "healed", "sft"):
        folder = out / name
        assert (folder / "config.json").is_file() and (folder / "model.safetensors").is_file(), name
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        assert config["model_type"] == "lns_llama" and config["lns"]["alpha"] == 1.0, name
        assert (folder / "modeling_lns.py").is_file() and (folder / "tokenizer.json").is_file(), name
    assert (out / "sft" / "adapter" / "adapter_config.json").is_file()
    assert (out / "healed" / "metrics.json").is_file() and (out / "sft" / "recipe.yaml").is_file()

    report = json.loads((out / "analysis" / "report.json").read_text(encoding="utf-8"))
    assert [m["name"] for m in report["models"]] == ["base", "converted", "healed", "sft"]
    assert [m["status"] for m in report["models"]] == ["stock", "lns", "lns", "lns"]
    plots = summary["stages"]["analyze"]["plots"]
    assert {"analysis/variance.png", "analysis/removal.png", "analysis/angular-base.png",
            "analysis/effective-scales.png"} <= set(plots)  # the LNS models record builtin:demo as their source
    for plot in plots:
        assert (out / plot).read_bytes().startswith(b"\x89PNG"), plot

    artefacts = summary["artefacts"]
    for path in [p for p in artefacts.values() if isinstance(p, str)] + artefacts["analysis_plots"]:
        assert (out / path).exists(), path
    markdown = (out / "summary.md").read_text(encoding="utf-8")
    assert "## What happened" in markdown and "![variance](analysis/variance.png)" in markdown
    assert not [p.name for p in out.parent.iterdir() if p.name.startswith(".")], "staging folders left behind"


@pytest.mark.floor
@pytest.mark.slow
def test_figures_are_finite_and_the_stages_did_their_job(quick_demo):
    _, summary, result = quick_demo
    stages = summary["stages"]
    assert set(stages) == {"base", "convert", "heal", "sft", "analyze", "export"}
    for where, number in _numbers(stages):
        assert math.isfinite(number), where
    for stage in ("base", "convert", "heal", "sft"):
        assert stages[stage]["heldout_perplexity"] > 1.0
        assert 0.0 <= stages[stage]["exact_match"]["all"] <= 1.0
    # the surgery changes the function; healing with the ramp wins back perplexity
    assert stages["convert"]["heldout_perplexity"] != pytest.approx(stages["base"]["heldout_perplexity"], rel=1e-3)
    assert stages["heal"]["heldout_perplexity"] < stages["convert"]["heldout_perplexity"]
    assert stages["heal"]["lns_alpha"] == 1.0 and stages["heal"]["steps"] == QUICK.heal_steps
    assert stages["sft"]["exact_match_before"] == stages["heal"]["exact_match"]
    # the console showed a line per stage and the table
    for number in range(1, 7):
        assert f"[{number}/6]" in result.stdout
    assert "held-out ppl" in result.stdout and "exact match" in result.stdout
    # and nothing else: Trainer logs as short lines, no raw log dicts, weight-loading bars or DeepSpeed notices
    console = result.stdout + result.stderr
    assert f"/{QUICK.heal_steps}: loss" in console and "{'loss'" not in console
    assert "Loading weights" not in console and "Setting accelerator" not in console


@pytest.mark.floor
@pytest.mark.slow
def test_the_export_reloads_in_a_fresh_process_and_matches(quick_demo):
    _, summary, _ = quick_demo
    export = summary["stages"]["export"]
    assert export["remote_code"] and export["loaded_class"].endswith("LNSLlamaForCausalLM")
    assert export["logits_match"] and export["max_abs_logit_difference"] <= 1e-4
    assert export["greedy_answers_match"]
    assert export["lns_alpha"] == 1.0


@pytest.mark.floor
def test_existing_out_is_refused_in_one_line(tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine", encoding="utf-8")
    result = invoke_cli("demo", "--out", str(out))
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "--overwrite" in result.stderr
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_steps_scale_scales_the_training_runs_only():
    settings = DemoSettings().scaled(0.5)
    assert settings.heal_steps == DemoSettings.heal_steps // 2 and settings.sft_steps == DemoSettings.sft_steps // 2
    assert settings.heal_ramp_steps < settings.heal_steps
    assert settings.heldout_documents == DemoSettings.heldout_documents
    result = invoke_cli("demo", "--steps-scale", "0", "--out", "never-written")
    assert result.returncode == 2 and "Invalid value" in result.stderr
