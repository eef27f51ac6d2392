"""What `lns-surgery push` checks before anything goes up: the file selection, the folder, and a
stranger's load in a fresh process without lns_surgery."""

from __future__ import annotations

import json
import shutil
import struct

import pytest
from conftest import STORIES, shared_path

from lns_surgery.core.checkpoint import read_safetensors_header
from lns_surgery.core.errors import LNSError
from lns_surgery.publish.files import select_files, staged_view
from lns_surgery.publish.validate import check_checkpoint, validate_checkpoint


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """An LNS (custom-code) and a folded conversion of the real stories260K model."""
    import lns_surgery

    stories = shared_path(STORIES)
    root = tmp_path_factory.mktemp("publish-validate")
    lns_surgery.convert(stories, root / "lns")
    lns_surgery.convert(stories, root / "folded", mode="fold")
    return root


@pytest.fixture
def lns_copy(checkpoints, tmp_path):
    target = tmp_path / "model"
    shutil.copytree(checkpoints / "lns", target)
    return target


def _refusal(folder) -> str:
    with pytest.raises(LNSError) as caught:
        check_checkpoint(folder)
    message = str(caught.value)
    assert "\n" not in message and message.startswith(f"cannot publish '{folder}'")
    return message


# --- which files go up ----------------------------------------------------------------------------


def test_select_files_leaves_out_training_state_and_keeps_the_model(tmp_path):
    layout = {
        "config.json": b"{}", "model.safetensors": b"x" * 10, "README.md": b"card", ".gitattributes": b"*.bin lfs",
        "metrics.json": b"{}", "report.json": b"{}", "trainer_state.json": b"{}", "plots/variance.png": b"png",
        "optimizer.pt": b"o", "scheduler.pt": b"s", "scaler.pt": b"s", "rng_state.pth": b"r", "rng_state_1.pth": b"r",
        "training_args.bin": b"pickle", "checkpoint-500/model.safetensors": b"m", "checkpoint-500/optimizer.pt": b"o",
        "runs/Jan01/events.out.tfevents": b"e", "wandb/run/log": b"w", ".cache/huggingface/upload": b"c",
        "__pycache__/modeling_lns.cpython-311.pyc": b"c", ".DS_Store": b"d", "global_step500/zero_pp_rank_0_mp_rank_00_optim_states.pt": b"z",
        ".model.lns-tmp-123/config.json": b"{}",
    }
    for name, content in layout.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(content)

    selection = select_files(tmp_path)

    assert selection.paths() == sorted(["config.json", "model.safetensors", "README.md", ".gitattributes", "metrics.json",
                                        "report.json", "trainer_state.json", "plots/variance.png"])
    assert {item.path: item.size for item in selection.files}["model.safetensors"] == 10
    reasons = dict(selection.excluded)
    assert set(reasons) == set(layout) - set(selection.paths())
    assert reasons["optimizer.pt"] == "optimizer state"
    assert reasons["checkpoint-500/model.safetensors"] == "intermediate checkpoint"
    assert reasons["runs/Jan01/events.out.tfevents"] == "TensorBoard logs"
    assert "credentials" in reasons["training_args.bin"]
    assert reasons["rng_state_1.pth"] == "random-number-generator state"


def test_staged_view_holds_exactly_the_selection(checkpoints, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(checkpoints / "lns", folder)
    (folder / "optimizer.pt").write_bytes(b"state")
    selection = select_files(folder)
    with staged_view(selection, {"README.md": "# card\n"}) as view:
        seen = sorted(path.relative_to(view).as_posix() for path in view.rglob("*") if path.is_file())
        assert seen == sorted(set(selection.paths()) | {"README.md"})
        assert (view / "model.safetensors").read_bytes() == (folder / "model.safetensors").read_bytes()
        assert (view / "README.md").read_text() == "# card\n"
    assert not view.exists()


# --- the folder -----------------------------------------------------------------------------------


def test_check_accepts_both_kinds_with_their_scales(checkpoints):
    lns = check_checkpoint(checkpoints / "lns")
    assert lns.kind == "lns" and lns.num_layers == 5
    assert set(lns.code_files) == {"configuration_lns.py", "modeling_lns.py", "lns_layers.py"}
    assert lns.weight_files == ("model.safetensors",)
    assert lns.scales == pytest.approx([1.0, 2 ** -0.5, 3 ** -0.5, 0.5, 5 ** -0.5])
    folded = check_checkpoint(checkpoints / "folded")
    assert folded.kind == "lns-folded" and folded.code_files == ()
    assert folded.scales == pytest.approx(lns.scales)


@pytest.mark.parametrize("removed, expected", [
    ("modeling_lns.py", "custom-code file 'modeling_lns.py' (needed by auto_map) is missing"),
    ("configuration_lns.py", "custom-code file 'configuration_lns.py' (needed by auto_map) is missing"),
    ("lns_layers.py", "custom-code file 'lns_layers.py' (needed by"),
])
def test_refuses_a_missing_custom_code_file(lns_copy, removed, expected):
    (lns_copy / removed).unlink()
    assert expected in _refusal(lns_copy)


def test_refuses_truncated_and_damaged_weights(lns_copy):
    weights = lns_copy / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    assert "weights are damaged" in _refusal(lns_copy) and "truncated" in _refusal(lns_copy)
    weights.write_bytes(struct.pack("<Q", 40) + b"{not json at all, just garbage bytes}" + data[48:])
    assert "damaged header" in _refusal(lns_copy)


def test_refuses_an_index_that_names_a_missing_shard(lns_copy):
    header = read_safetensors_header(lns_copy / "model.safetensors")
    index = {"metadata": {}, "weight_map": {name: "model-00001-of-00002.safetensors" for name in header}}
    (lns_copy / "model.safetensors").rename(lns_copy / "model-00002-of-00002.safetensors")
    (lns_copy / "model.safetensors.index.json").write_text(json.dumps(index))
    assert "shard 'model-00001-of-00002.safetensors'" in _refusal(lns_copy)


def test_refuses_what_is_not_a_publishable_lns_checkpoint(stories_path, lns_copy, tmp_path):
    assert "not an LNS checkpoint" in _refusal(stories_path)

    config = json.loads((lns_copy / "config.json").read_text())
    config["model_type"] = config["lns"]["base_model_type"]
    (lns_copy / "config.json").write_text(json.dumps(config))
    assert "reuses the stock model_type 'llama'" in _refusal(lns_copy)

    del config["auto_map"]
    (lns_copy / "config.json").write_text(json.dumps(config))
    assert "no auto_map" in _refusal(lns_copy)

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    assert "PEFT adapter" in _refusal(adapter)


def test_lns_surgerys_own_files_stay_home(lns_copy):
    """The output marker (it names the writing process and host), lock and temporary files: huggingface_hub's
    own upload would send them."""
    (lns_copy / ".README.md.lns-tmp-123").write_text("half a card")
    (lns_copy / "model.lns-lock").write_text("")
    reasons = dict(select_files(lns_copy).excluded)
    assert reasons[".lns-surgery-output"] == "lns-surgery's own bookkeeping (the output marker)"
    assert reasons["model.lns-lock"] == "lns-surgery's lock file"
    assert reasons[".README.md.lns-tmp-123"] == "a temporary file of an lns-surgery run"
    assert not any(".lns" in path for path in select_files(lns_copy).paths())


def _record_source(folder, block: str, model) -> None:
    config = json.loads((folder / "config.json").read_text())
    config[block]["source"] = {"model": model, "revision": None}
    (folder / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("recorded", ["/home/me/models/stories260K", "../models/stories260K", "~/stories260K",
                                      "models/stories260K/v2", "C:\\Users\\me\\stories260K", "local-owner/model"])
def test_refuses_a_source_recorded_as_a_path_of_this_machine(checkpoints, lns_copy, tmp_path, monkeypatch, recorded):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "local-owner" / "model").mkdir(parents=True)  # 'owner/name' that is a folder here: a path
    _record_source(lns_copy, "lns", recorded)
    message = _refusal(lns_copy)
    assert f"records where its source lies on this machine (lns.source.model = '{recorded}')" in message
    folded = tmp_path / "folded"
    shutil.copytree(checkpoints / "folded", folded)
    _record_source(folded, "lns_folded", recorded)
    assert f"(lns_folded.source.model = '{recorded}')" in _refusal(folded)


@pytest.mark.parametrize("recorded", ["HuggingFaceTB/SmolLM2-135M", "gpt2", "builtin:llama-tiny", "stories260K", None])
def test_a_hub_id_a_builtin_or_a_folders_name_may_be_published(lns_copy, recorded):
    _record_source(lns_copy, "lns", recorded)
    assert check_checkpoint(lns_copy).source["model"] == recorded


def test_conversions_record_a_local_source_by_its_name_only(checkpoints, stories_path):
    for kind, block in (("lns", "lns"), ("folded", "lns_folded")):
        source = json.loads((checkpoints / kind / "config.json").read_text())[block]["source"]
        assert source == {"model": stories_path.name, "revision": None, "local": True}
        assert str(stories_path.parent) not in (checkpoints / kind / "config.json").read_text()
    check_checkpoint(checkpoints / "lns")


def test_refuses_a_checkpoint_without_tokenizer(lns_copy):
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (lns_copy / name).unlink()
    assert "no tokenizer" in _refusal(lns_copy)


# --- a stranger's load ----------------------------------------------------------------------------


def test_validation_runs_no_code_of_the_folder_unless_asked(lns_copy):
    with open(lns_copy / "modeling_lns.py", "a") as handle:
        handle.write("\nraise RuntimeError('importing this module runs it')\n")
    validation = validate_checkpoint(lns_copy)
    assert validation.load is None and "without running the folder's code" in validation.summary()


def test_fresh_process_loads_both_kinds(checkpoints):
    lns = validate_checkpoint(checkpoints / "lns", check_load=True)
    assert lns.load.model_class == "LNSLlamaForCausalLM" and lns.load.remote_code and lns.load.sandboxed
    assert lns.load.num_parameters > 200_000 and lns.load.logits_shape[-1] == 512
    folded = validate_checkpoint(checkpoints / "folded", check_load=True)
    assert folded.load.model_class == "LlamaForCausalLM" and not folded.load.remote_code
    assert "fresh process without lns-surgery, in a sandbox" in lns.summary()


def test_fresh_process_refuses_weights_that_give_nan(lns_copy):
    """Header intact, values damaged: only the forward pass can tell."""
    entry = read_safetensors_header(lns_copy / "model.safetensors")["model.layers.2.mlp.down_proj.weight"]
    with open(lns_copy / "model.safetensors", "r+b") as handle:
        handle.seek(entry.start)
        handle.write(struct.pack("<f", float("nan")) * ((entry.end - entry.start) // 4))
    with pytest.raises(LNSError, match=r"non-finite logits") as caught:
        validate_checkpoint(lns_copy, check_load=True)
    assert "\n" not in str(caught.value)


def test_fresh_process_refuses_custom_code_that_does_not_run(lns_copy):
    with open(lns_copy / "modeling_lns.py", "a") as handle:
        handle.write("\nraise RuntimeError('this module is broken')\n")
    with pytest.raises(LNSError, match=r"from_pretrained\(trust_remote_code=True\) failed: RuntimeError: this module is broken"):
        validate_checkpoint(lns_copy, check_load=True)
