"""`lns-surgery analyze` end to end on a real pretrained model, and its refusals."""

from __future__ import annotations

import json
import math
import sys
import types

import pytest
import torch
from tiny_models import tiny_model

import lns_surgery
from conftest import run_cli, shared_path
from lns_surgery.analysis import analyze, evaluate_nll
from lns_surgery.core.errors import LNSError

LAYER_KEYS = {"index", "block", "lns_scale", "output_variance", "residual_norm", "attention_update_norm",
              "mlp_update_norm", "angular_distance_next", "removal_perplexity", "removal_loss_increase"}
MODEL_KEYS = {"name", "status", "lns_alpha", "model_type", "num_layers", "num_parameters", "dtype", "data", "windows",
              "seq_len", "tokens", "perplexity", "loss", "embedding_variance", "angular_distance_tokens",
              "angular_distance", "angular_distance_plot", "tasks", "effective_scales_source", "layers"}


def _finite_numbers(value):
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return True
    if isinstance(value, (int, float)):
        return math.isfinite(value)
    if isinstance(value, dict):
        return all(_finite_numbers(item) for item in value.values())
    return all(_finite_numbers(item) for item in value)


def _is_png(path):
    data = path.read_bytes()
    return data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_analyze_stories_stock_lns_and_folded_side_by_side(tmp_path, stories_path):
    text = shared_path("data/tinyshakespeare/input.txt")
    lns_surgery.convert(stories_path, tmp_path / "stories-lns")
    lns_surgery.convert(stories_path, tmp_path / "stories-folded", mode="fold")
    out = tmp_path / "report"
    result = run_cli("analyze", str(stories_path), str(tmp_path / "stories-lns"), str(tmp_path / "stories-folded"),
                     "--data", str(text), "--out", str(out), "--max-tokens", "3072", "--seq-len", "128",
                     "--source", str(stories_path))
    assert result.returncode == 0, result.stderr
    assert "wrote" in result.stdout

    report = json.loads((out / "report.json").read_text())
    assert report["schema_version"] == 1 and _finite_numbers(report)
    assert report["settings"]["max_tokens"] == 3072 and report["settings"]["last_token"] is False
    stock, lns, folded = report["models"]
    assert [m["status"] for m in report["models"]] == ["stock", "lns", "lns-folded"]
    for model in report["models"]:
        assert set(model) == MODEL_KEYS
        assert model["num_layers"] == 5 and len(model["layers"]) == 5
        assert model["windows"] == 24 and model["seq_len"] == 128 and model["tokens"] == 3072
        assert 1 < model["perplexity"] < 512  # better than uniform over the 512-token vocabulary
        assert [len(row) for row in model["angular_distance"]] == [5, 4, 3, 2, 1]
        for layer in model["layers"]:
            # LNS and folded models are measured against --source (they record a local source by name only)
            assert set(layer) == LAYER_KEYS | ({"effective_scale"} if model["status"] != "stock" else set())
            assert layer["removal_perplexity"] > 0 and layer["output_variance"] > 0
            assert 0 < layer["angular_distance_next"] < 1
            assert layer["removal_loss_increase"] == pytest.approx(math.log(layer["removal_perplexity"] / model["perplexity"]), abs=1e-9)
        assert _is_png(out / model["angular_distance_plot"])
    assert [layer["lns_scale"] for layer in lns["layers"]] == pytest.approx([1 / math.sqrt(b) for b in range(1, 6)])
    assert [layer["lns_scale"] for layer in stock["layers"]] == [1.0] * 5
    for model in (lns, folded):  # right after conversion, the effective scale is the nominal one
        assert model["effective_scales_source"] == str(stories_path)
        for layer in model["layers"]:
            assert list(layer["effective_scale"].values()) == pytest.approx([layer["lns_scale"]] * 2, rel=1e-6)
    # Block 1 is unscaled, so its output is the stock one; later blocks differ.
    assert lns["layers"][0]["output_variance"] == pytest.approx(stock["layers"][0]["output_variance"], rel=1e-6)
    assert lns["layers"][4]["output_variance"] != pytest.approx(stock["layers"][4]["output_variance"], rel=1e-3)
    # Folding is the same function up to rounding.
    assert folded["perplexity"] == pytest.approx(lns["perplexity"], rel=1e-4)
    assert [l["removal_perplexity"] for l in folded["layers"]] == pytest.approx([l["removal_perplexity"] for l in lns["layers"]], rel=1e-4)

    assert _is_png(out / "variance.png") and _is_png(out / "removal.png")
    summary = (out / "summary.md").read_text()
    assert "| block | LNS scale | output variance" in summary and "## Side by side" in summary
    assert str(tmp_path / "stories-lns") in summary and "angular-" in summary
    assert not list(tmp_path.glob(".report*"))  # no staging folder left behind


@pytest.fixture
def stories_text(tmp_path):
    path = tmp_path / "text.txt"
    path.write_text(shared_path("data/tinyshakespeare/input.txt").read_text()[:20_000])
    return path


@pytest.mark.parametrize("case", ["empty data", "seq-len too long", "out exists"])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, stories_path, stories_text, case):
    out = tmp_path / "report"
    data = stories_text
    extra = []
    if case == "empty data":
        data = tmp_path / "empty.txt"
        data.write_text("")
    elif case == "seq-len too long":
        extra = ["--seq-len", "1024"]  # stories260K has 512 positions
    else:
        out.mkdir()
        (out / "keep.txt").write_text("mine")
    result = run_cli("analyze", str(stories_path), "--data", str(data), "--out", str(out), "--max-tokens", "2048", *extra)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert {"empty data": "has no text", "seq-len too long": "longer than", "out exists": "--overwrite"}[case] in lines[0]
    if case == "out exists":
        assert [p.name for p in out.iterdir()] == ["keep.txt"]
    else:
        assert not out.exists()
    assert not list(tmp_path.glob(".report*"))


def test_tasks_without_lm_eval_ask_for_the_eval_extra(tmp_path, stories_path, stories_text, monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # as on an install without the extra
    with pytest.raises(LNSError, match=r"pip install 'lns-surgery\[eval\]'"):
        analyze([stories_path], stories_text, tmp_path / "report", tasks="arc_easy", progress=False)
    assert not (tmp_path / "report").exists()


@pytest.mark.skipif(__import__("importlib").util.find_spec("lm_eval") is not None, reason="lm-eval is installed here")
def test_cli_tasks_without_lm_eval(tmp_path, stories_path, stories_text):
    result = run_cli("analyze", str(stories_path), "--data", str(stories_text), "--out", str(tmp_path / "r"), "--tasks", "arc_easy")
    assert result.returncode == 2 and "lns-surgery[eval]" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "r").exists()


def _fake_lm_eval(monkeypatch, windows):
    """An lm-eval stand-in whose single 'task' scores the model by its loss on ``windows``, so the
    removal sweep's task numbers can be checked against the perplexity sweep."""
    calls = []

    class HFLM:
        def __init__(self, pretrained, tokenizer, batch_size):
            self.model = pretrained

    class TaskManager:  # every name is a task with some documents
        def __init__(self, include_path=None, include_defaults=True):
            self.all_tasks = []

        def load(self, specs):
            return {"tasks": {spec: types.SimpleNamespace(eval_docs=[{}] * 7) for spec in specs}, "groups": {}}

    def simple_evaluate(model, tasks, limit=None, task_manager=None):
        assert isinstance(task_manager, TaskManager)
        calls.append((tasks, limit))
        nll, count = evaluate_nll(model.model, windows)
        return {"results": {task: {"alias": task, "loss,none": nll / count, "loss_stderr,none": 0.0} for task in tasks}}

    package = types.ModuleType("lm_eval")
    package.simple_evaluate = simple_evaluate
    models = types.ModuleType("lm_eval.models")
    huggingface = types.ModuleType("lm_eval.models.huggingface")
    huggingface.HFLM = HFLM
    task_module = types.ModuleType("lm_eval.tasks")
    task_module.TaskManager = TaskManager
    for name, module in {"lm_eval": package, "lm_eval.models": models, "lm_eval.models.huggingface": huggingface,
                         "lm_eval.tasks": task_module}.items():
        monkeypatch.setitem(sys.modules, name, module)
    return calls


def test_task_removal_sweep_runs_each_task_with_each_block_bypassed(tmp_path, stories_path, monkeypatch):
    model = lns_surgery.load_model(str(stories_path))
    windows = torch.randint(3, 512, (4, 16), generator=torch.Generator().manual_seed(1))
    calls = _fake_lm_eval(monkeypatch, windows)
    texts = ["the cat sat on the mat " * 50]  # feeds the perplexity part; the fake task uses `windows`
    report = analyze([model], texts, tmp_path / "report", tokenizer=lns_surgery.load_tokenizer(str(stories_path)),
                     names=["stories"], max_tokens=256, seq_len=32, tasks="fake_task", tasks_limit=7, progress=False)
    entry = report["models"][0]
    assert len(calls) == 5 + 1 and all(call == (["fake_task"], 7) for call in calls)
    nll, count = evaluate_nll(model, windows)
    assert entry["tasks"] == {"fake_task": {"loss": pytest.approx(nll / count), "loss_stderr": 0.0}}
    from lns_surgery.analysis import depth_measures

    removal = depth_measures(model, windows)["removal_loss"]
    assert [layer["removal_tasks"]["fake_task"]["loss"] for layer in entry["layers"]] == pytest.approx(removal, rel=1e-6)
    assert "fake_task loss" in (tmp_path / "report" / "summary.md").read_text()


def test_analyze_in_memory_models_and_overwrite(tmp_path, stories_path):
    tokenizer = lns_surgery.load_tokenizer(str(stories_path))
    stock = lns_surgery.load_model(str(stories_path))
    texts = ["Once upon a time, there was a little girl named Lily. She loved to play outside."] * 40
    out = tmp_path / "report"
    first = analyze([stock], texts, out, tokenizer=tokenizer, names=["stories"], max_tokens=512, seq_len=64,
                    last_token=True, progress=False)
    assert first["models"][0]["angular_distance_tokens"] == "last" and first["models"][0]["windows"] == 8
    with pytest.raises(LNSError, match="already exists"):
        analyze([stock], texts, out, tokenizer=tokenizer, max_tokens=512, seq_len=64, progress=False)
    lns_model = lns_surgery.apply_layernorm_scaling(lns_surgery.load_model(str(stories_path)))
    # converted in memory, the LNS model records its source by the folder's name only: named here
    second = analyze([stock, lns_model], texts, out, tokenizer=tokenizer, names=["stock", "lns"], max_tokens=512,
                     seq_len=64, overwrite=True, progress=False, source=str(stories_path))
    assert [m["name"] for m in second["models"]] == ["stock", "lns"]
    assert json.loads((out / "report.json").read_text())["models"][1]["status"] == "lns"
    assert sorted(p.name for p in out.iterdir()) == [".lns-surgery-output", "angular-lns.png", "angular-stock.png",
                                                     "effective-scales.png", "removal.png", "report.json", "summary.md",
                                                     "variance.png"]


def test_token_ids_outside_the_vocabulary_are_refused(tmp_path, stories_path):
    texts = ["Once upon a time, there was a little girl named Lily."] * 20
    with pytest.raises(LNSError, match="outside the vocabulary"):  # a 128-token model, a 512-token tokenizer
        analyze([tiny_model("llama")], texts, tmp_path / "report", tokenizer=lns_surgery.load_tokenizer(str(stories_path)),
                max_tokens=256, seq_len=32, progress=False)
    assert not (tmp_path / "report").exists()


def test_missing_models_are_refused_before_anything_is_loaded(tmp_path):
    (tmp_path / "not-a-model").mkdir()
    for model, message in [(tmp_path / "nope", "no such model folder"), ("someone/missing-model", "could not be fetched"),
                           (tmp_path / "not-a-model", "has no config.json")]:
        with pytest.raises(LNSError, match=message):
            analyze([model], ["some text"], tmp_path / "report", progress=False)
    assert not (tmp_path / "report").exists()
