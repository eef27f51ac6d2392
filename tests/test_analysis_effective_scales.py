"""Effective LNS scales against the source checkpoint: the nominal 1/sqrt(l) right after conversion,
1 where the norm weights have learnt to undo it, in code, fold and one-plus (Gemma) norms."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from conftest import STORIES, shared_path
from tiny_models import tiny_model

import lns_surgery
from lns_surgery.analysis.effective_scales import effective_scales
from lns_surgery.analysis.run import analyze
from lns_surgery.core.errors import LNSError

NORMS = ["input_layernorm", "post_attention_layernorm"]


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    stories = shared_path(STORIES)
    root = tmp_path_factory.mktemp("effective")
    return {"code": lns_surgery.convert(stories, root / "code"),
            "fold": lns_surgery.convert(stories, root / "fold", mode="fold")}


@pytest.fixture
def stories_text(tmp_path):
    path = tmp_path / "text.txt"
    path.write_text(shared_path("data/tinyshakespeare/input.txt").read_text()[:20_000])
    return path


def _check(result, expected_per_block):
    assert result["norms"] == NORMS
    for row, expected in zip(result["per_block"], expected_per_block, strict=True):
        assert row == pytest.approx([expected] * len(NORMS), rel=1e-6)


@pytest.mark.parametrize("mode", ["code", "fold"])
def test_right_after_conversion_the_effective_scale_is_the_nominal_one(converted, stories_path, mode):
    model = lns_surgery.load_model(converted[mode])
    result = effective_scales(model, str(stories_path))
    assert result["source"] == str(stories_path)
    _check(result, [1 / math.sqrt(index + 1) for index in range(5)])


def test_a_recorded_source_is_found_in_the_hub_cache_and_a_local_one_needs_the_flag(stories_path, tmp_path,
                                                                                    monkeypatch, caplog):
    """A checkpoint converted from a Hub id records the id and finds its source in the local Hub cache;
    one converted from a local folder records only the folder's name, so the source must be given."""
    import huggingface_hub

    commit = "0123456789abcdef0123456789abcdef01234567"
    repository = tmp_path / "hub" / "models--tester--stories260K"
    (repository / "refs").mkdir(parents=True)
    (repository / "refs" / "main").write_text(commit)
    shutil.copytree(stories_path, repository / "snapshots" / commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    from_hub = lns_surgery.convert(repository / "snapshots" / commit, tmp_path / "from-hub")
    assert json.loads((from_hub / "config.json").read_text())["lns"]["source"] == {"model": "tester/stories260K",
                                                                                    "revision": commit}
    result = effective_scales(lns_surgery.load_model(from_hub))
    assert result["source"] == str(repository / "snapshots" / commit)
    _check(result, [1 / math.sqrt(index + 1) for index in range(5)])

    local = lns_surgery.load_model(lns_surgery.convert(stories_path, tmp_path / "from-folder"))
    with caplog.at_level("WARNING", logger="lns_surgery"):
        assert effective_scales(local) is None
    assert "records as 'stories260K' (a local folder, recorded by its name only): give its folder with --source" \
        in caplog.text


def test_norms_that_learnt_sqrt_l_give_back_one(converted, stories_path, tmp_path):
    model = lns_surgery.load_model(converted["code"])
    with torch.no_grad():  # what unconstrained healing can converge to: the stock function again
        for index, block in enumerate(model.model.layers):
            for norm in NORMS:
                block.get_submodule(norm).weight.mul_(math.sqrt(index + 1))
    _check(effective_scales(model, str(stories_path)), [1.0] * 5)
    stock = lns_surgery.load_model(stories_path)
    ids = torch.tensor([[1, 403, 407, 261, 378]])
    with torch.no_grad():  # the same function as the source: the scaling is gone, as the figure says
        torch.testing.assert_close(model(input_ids=ids).logits, stock(input_ids=ids).logits, rtol=1e-4, atol=1e-4)


def test_one_plus_norms_compare_their_effective_weight(tmp_path):
    stock = tiny_model("gemma")
    stock.save_pretrained(tmp_path / "gemma")
    model = lns_surgery.load_model(lns_surgery.convert(tmp_path / "gemma", tmp_path / "gemma-lns"))
    result = effective_scales(model, str(tmp_path / "gemma"))
    assert result["norms"] == NORMS
    for index, row in enumerate(result["per_block"]):
        assert row == pytest.approx([1 / math.sqrt(index + 1)] * 2, rel=1e-5)


def test_source_flag_stock_models_and_a_wrong_source(converted, stories_path, tmp_path):
    model = lns_surgery.load_model(converted["code"])
    assert effective_scales(lns_surgery.load_model(stories_path)) is None  # nothing was scaled
    model.config.lns = {**model.config.lns, "source": {"model": "someone/not-on-this-machine"}}
    assert effective_scales(model) is None
    assert effective_scales(model, str(stories_path))["per_block"][1] == pytest.approx([2 ** -0.5] * 2)
    other = tiny_model("llama")
    other.save_pretrained(tmp_path / "other")
    with pytest.raises(LNSError, match="this model's source"):
        effective_scales(model, str(tmp_path / "other"))


def test_the_report_has_them_per_block_with_a_table_and_a_plot(converted, stories_path, stories_text, tmp_path):
    out = tmp_path / "report"
    analyze([str(stories_path), str(converted["code"])], stories_text, out, max_tokens=512, seq_len=64,
            progress=False, source=str(stories_path))
    report = json.loads((out / "report.json").read_text())
    stock, lns = report["models"]
    assert stock["effective_scales_source"] is None and "effective_scale" not in stock["layers"][0]
    assert lns["effective_scales_source"] == str(stories_path)
    assert lns["layers"][3]["effective_scale"] == pytest.approx({norm: 0.5 for norm in NORMS})
    assert report["plots"]["effective_scales"] == "effective-scales.png"
    assert (out / "effective-scales.png").stat().st_size > 10_000
    summary = (out / "summary.md").read_text()
    assert "Effective LNS scale" in summary and "![effective LNS scales](effective-scales.png)" in summary
