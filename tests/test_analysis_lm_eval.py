"""lm-evaluation-harness for real: local tasks (a folder, a YAML file, names) through ``analyze``'s
layer-removal sweep on stories260K converted by the tool, checked against ``lm_eval.simple_evaluate``
called directly; and every task checked before any model runs."""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import pytest
from torch import nn

pytest.importorskip("lm_eval", reason="needs lns-surgery[eval] (lm-eval-harness)")

import lns_surgery  # noqa: E402
from conftest import invoke_cli, shared_path  # noqa: E402
from lns_surgery import LNSError  # noqa: E402
from lns_surgery.analysis.run import analyze  # noqa: E402
from lns_surgery.analysis.tasks import resolve_tasks  # noqa: E402

LIMIT = 8
ROLLING = "lns_test_c4_rolling"
CHOICE = "lns_test_alpaca_response"


def _rolling_yaml(data: Path) -> str:
    """A perplexity task (lm-eval's wikitext recipe) over the shared C4 sample, read in place."""
    return f"""\
task: {ROLLING}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {json.dumps(str(data))}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
"""


def _choice_yaml(data: Path) -> str:
    """A multiple-choice task: which of four responses (the start of each) answers an Alpaca instruction;
    the three distractors are the responses to other instructions."""
    return f"""\
task: {CHOICE}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {json.dumps(str(data))}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
  - metric: brier_score
    higher_is_better: false
"""


@pytest.fixture(scope="module")
def local_tasks(tmp_path_factory):
    """{"include": a task folder holding the rolling task, "choice": the multiple-choice task's YAML
    file outside it}; the rolling task reads ../shared's C4 sample in place, the choice rows are built
    here from ../shared's Alpaca records."""
    c4 = shared_path("data/c4-sample/c4_sample300.jsonl")
    alpaca = json.loads(shared_path("data/alpaca/alpaca_first100.json").read_text(encoding="utf-8"))[:8]
    root = tmp_path_factory.mktemp("lm-eval-tasks")
    include = root / "include"
    include.mkdir()
    (include / "rolling.yaml").write_text(_rolling_yaml(c4))
    responses = [" " + " ".join(record["output"].split()[:8]) for record in alpaca]
    rows = [{"context": f"Instruction: {record['instruction']}\nResponse:",
             "choices": [responses[(index + k) % len(alpaca)] for k in range(4)], "label": 0}
            for index, record in enumerate(alpaca)]
    choice_data = root / "alpaca_response.jsonl"
    choice_data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    choice = root / "alpaca_response.yaml"
    choice.write_text(_choice_yaml(choice_data))
    return {"include": include, "choice": choice}


@pytest.fixture(scope="module")
def lns_stories(tmp_path_factory):
    out = tmp_path_factory.mktemp("stories-lns") / "lns"
    return lns_surgery.convert(shared_path("models/stories260K"), out)


class _Bypass(nn.Module):
    """A decoder block that returns its input: the block deleted, the others keeping their indices."""

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states


def _direct(model, tokenizer, specs, manager):
    """lm-eval's own numbers: simple_evaluate on HFLM around ``model``, nothing of this package in between."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    output = lm_eval.simple_evaluate(model=HFLM(pretrained=model, tokenizer=tokenizer, batch_size=8), tasks=specs,
                                     limit=LIMIT, task_manager=manager)
    return {task: {key.split(",")[0]: value for key, value in metrics.items()
                   if "," in key and isinstance(value, float)}
            for task, metrics in output["results"].items()}


def test_local_tasks_through_the_removal_sweep_equal_lm_eval_itself(tmp_path, lns_stories, local_tasks):
    text = shared_path("data/tinyshakespeare/input.txt")
    out = tmp_path / "report"
    # One task by name from the --tasks-include folder, one as a YAML file (results come back by name).
    report = analyze([lns_stories], text, out, max_tokens=256, seq_len=64, tasks=f"{ROLLING},{local_tasks['choice']}",
                     tasks_include=[local_tasks["include"]], tasks_limit=LIMIT, progress=False)
    entry = report["models"][0]
    assert entry["status"] == "lns" and entry["num_layers"] == 5
    assert set(entry["tasks"]) == {ROLLING, CHOICE}
    assert set(entry["tasks"][ROLLING]) >= {"word_perplexity", "byte_perplexity", "bits_per_byte"}
    # brier_score depends on every choice's log-likelihood, not only on which one wins
    assert set(entry["tasks"][CHOICE]) >= {"acc", "acc_norm", "acc_stderr", "brier_score"}
    for layer in entry["layers"]:
        assert set(layer["removal_tasks"]) == {ROLLING, CHOICE}
        assert all(layer["removal_tasks"][task] for task in (ROLLING, CHOICE))
    assert report["settings"]["tasks_include"] == [str(local_tasks["include"].resolve())]
    # Local tasks need none of lm-eval's own: its ~15,000 task files were not indexed (seconds).
    plan = resolve_tasks(f"{ROLLING},{local_tasks['choice']}", [local_tasks["include"]])
    assert plan.tasks == [ROLLING, CHOICE] and "arc_easy" not in plan.manager.all_tasks
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk["models"][0]["tasks"] == entry["tasks"]
    assert f"{ROLLING} bits_per_byte" in (out / "summary.md").read_text()

    model = lns_surgery.load_model(str(lns_stories))
    tokenizer = lns_surgery.load_tokenizer(str(lns_stories))
    from lm_eval.tasks import TaskManager

    # lm-eval's own manager, not the package's cached one; the local tasks need none of lm-eval's.
    manager = TaskManager(include_path=str(local_tasks["include"]), include_defaults=False)
    specs = [ROLLING, str(local_tasks["choice"])]
    whole = _direct(model, tokenizer, specs, manager)
    for task in (ROLLING, CHOICE):
        assert set(entry["tasks"][task]) == set(whole[task]), task
        for metric, value in whole[task].items():
            assert entry["tasks"][task][metric] == pytest.approx(value, rel=1e-12, abs=1e-12), (task, metric)

    # Block 3 deleted (a module that returns its input), the others keeping their own 1/sqrt(l).
    index = 2
    pruned = copy.deepcopy(model)
    pruned.model.layers[index] = _Bypass()
    removed = _direct(pruned, tokenizer, specs, manager)
    for task in (ROLLING, CHOICE):
        assert set(entry["layers"][index]["removal_tasks"][task]) == set(removed[task]), task
        for metric, value in removed[task].items():
            assert entry["layers"][index]["removal_tasks"][task][metric] == pytest.approx(value, rel=1e-9, abs=1e-12)
    for task, metric in ((ROLLING, "bits_per_byte"), (CHOICE, "brier_score")):
        assert removed[task][metric] != pytest.approx(whole[task][metric], rel=1e-3), (task, metric)
    # The sweep really bypasses: removing block 1 costs more than half a bit per byte.
    assert entry["layers"][0]["removal_tasks"][ROLLING]["bits_per_byte"] > entry["tasks"][ROLLING]["bits_per_byte"] + 0.5
    print(f"\n{ROLLING} whole: {entry['tasks'][ROLLING]}\n{CHOICE} whole: {entry['tasks'][CHOICE]}\n"
          f"block {index + 1} removed: {entry['layers'][index]['removal_tasks']}", file=sys.stderr)


def _no_model_may_run(monkeypatch):
    from lns_surgery.analysis import measures

    def refuse(*args, **kwargs):
        raise AssertionError("a model was evaluated before the tasks were checked")

    monkeypatch.setattr(measures, "depth_measures", refuse)


@pytest.mark.parametrize("case", ["local name without its folder", "misspelt name", "folder as a task", "broken task file"])
def test_every_task_is_checked_before_any_model_runs(tmp_path, lns_stories, local_tasks, monkeypatch, case):
    _no_model_may_run(monkeypatch)
    broken = tmp_path / "broken.yaml"
    broken.write_text(_rolling_yaml(tmp_path / "missing.jsonl").replace(ROLLING, "lns_test_broken"))
    tasks, extra, expected = {
        "local name without its folder": (ROLLING, [], f"unknown lm-eval task '{ROLLING}'"),
        "misspelt name": (ROLLING[:-1], ["--tasks-include", str(local_tasks["include"])], f"did you mean {ROLLING}"),
        "folder as a task": (str(local_tasks["include"]), [], "--tasks-include"),
        "broken task file": (str(broken), [], "could not build task"),
    }[case]
    out = tmp_path / "report"
    text = shared_path("data/tinyshakespeare/input.txt")
    # Two models: the old code ran the whole first model's sweep before noticing a bad task.
    result = invoke_cli("analyze", str(lns_stories), str(lns_stories), "--data", str(text), "--out", str(out),
                        "--max-tokens", "128", "--seq-len", "64", "--tasks", tasks, *extra)
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert expected in lines[0], lines[0]
    assert not out.exists() and not list(tmp_path.glob(".report*"))


def test_a_task_that_returns_no_metric_is_an_error(tmp_path, lns_stories, local_tasks, monkeypatch):
    """Never an empty ``{}`` in the report: lm-eval answering without a metric for a task fails."""
    import lm_eval

    def answers_without_metrics(model, tasks, limit=None, task_manager=None):
        return {"results": {ROLLING: {"alias": ROLLING, "sample_len": LIMIT}}}

    monkeypatch.setattr(lm_eval, "simple_evaluate", answers_without_metrics)
    with pytest.raises(LNSError, match=f"no metrics for task '{ROLLING}'"):
        analyze([lns_stories], ["Once upon a time there was a cat. " * 20], tmp_path / "report", max_tokens=128,
                seq_len=32, tasks=ROLLING, tasks_include=local_tasks["include"], progress=False)
    assert not (tmp_path / "report").exists()
