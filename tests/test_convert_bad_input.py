"""Bad input: one readable line, a non-zero exit, and nothing left at --out (nor beside it)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import invoke_cli, run_fresh_python, shared_path
from lns_reference import hooked_reference
from tiny_models import tiny_model

import lns_surgery
from lns_surgery.core.errors import LNSError


@pytest.fixture(scope="module")
def stock_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("stock") / "llama"
    tiny_model("llama").save_pretrained(folder)
    return folder


def _copy(folder, tmp_path, name="input"):
    target = tmp_path / name
    shutil.copytree(folder, target)
    return target


def _assert_refused(result, out, *fragments):
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")], "temporary folder left behind"


def test_missing_config(stock_dir, tmp_path):
    source = _copy(stock_dir, tmp_path)
    (source / "config.json").unlink()
    _assert_refused(invoke_cli("convert", str(source), "--out", str(tmp_path / "out")), tmp_path / "out", "config.json")


def test_truncated_safetensors(stock_dir, tmp_path):
    source = _copy(stock_dir, tmp_path)
    weights = source / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    for mode in ("code", "fold"):
        _assert_refused(invoke_cli("convert", str(source), "--out", str(tmp_path / "out"), "--mode", mode),
                        tmp_path / "out", "truncated")


def test_shard_missing_from_index(tmp_path):
    source = tmp_path / "sharded"
    tiny_model("llama").save_pretrained(source, max_shard_size="40KB")
    shard = sorted(source.glob("model-*.safetensors"))[1]
    shard.unlink()
    _assert_refused(invoke_cli("convert", str(source), "--out", str(tmp_path / "out")), tmp_path / "out", shard.name, "missing")


def test_unknown_hub_id_offline(tmp_path):
    _assert_refused(invoke_cli("convert", "nobody-here/no-such-model", "--out", str(tmp_path / "out")),
                    tmp_path / "out", "nobody-here/no-such-model")


def test_no_such_folder(tmp_path):
    _assert_refused(invoke_cli("convert", "./not/a/folder", "--out", str(tmp_path / "out")), tmp_path / "out", "no such")


def test_existing_output_needs_overwrite(stock_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    result = invoke_cli("convert", str(stock_dir), "--out", str(out))
    assert result.returncode != 0 and "--overwrite" in result.stderr
    assert (out / "keep.txt").read_text() == "precious"
    # --overwrite replaces only what lns-surgery wrote: a folder of the user's stays.
    result = invoke_cli("convert", str(stock_dir), "--out", str(out), "--overwrite")
    assert result.returncode == 2 and "not written by lns-surgery" in result.stderr
    assert (out / "keep.txt").read_text() == "precious"
    (out / "keep.txt").unlink()
    for _ in range(2):  # an empty folder, then the output the first run wrote
        result = invoke_cli("convert", str(stock_dir), "--out", str(out), "--overwrite")
        assert result.returncode == 0, result.stderr
        assert (out / "modeling_lns.py").exists() and (out / ".lns-surgery-output").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]


def test_already_lns_or_folded_input_is_never_scaled_twice(stock_dir, tmp_path):
    lns_surgery.convert(stock_dir, tmp_path / "lns")
    lns_surgery.convert(stock_dir, tmp_path / "folded", mode="fold")
    for source in ("lns", "folded"):
        for mode in ("code", "fold"):
            _assert_refused(invoke_cli("convert", str(tmp_path / source), "--out", str(tmp_path / "out"), "--mode", mode),
                            tmp_path / "out", "twice")
    _assert_refused(invoke_cli("fold", str(tmp_path / "folded"), "--out", str(tmp_path / "out")), tmp_path / "out", "already folded")
    _assert_refused(invoke_cli("fold", str(stock_dir), "--out", str(tmp_path / "out")), tmp_path / "out", "not an LNS checkpoint")
    # And in memory:
    model = lns_surgery.load_model(tmp_path / "lns")
    before = model(input_ids=torch.tensor([[5, 6, 7]])).logits
    assert torch.equal(lns_surgery.apply_layernorm_scaling(model)(input_ids=torch.tensor([[5, 6, 7]])).logits, before)
    from transformers import AutoModelForCausalLM

    with pytest.raises(LNSError, match="twice"):
        lns_surgery.apply_layernorm_scaling(AutoModelForCausalLM.from_pretrained(tmp_path / "folded"))


def test_post_norm_architecture_is_refused(tmp_path):
    source = tmp_path / "olmo2"
    tiny_model_type = "olmo2"
    from tiny_models import tiny_config
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_config(tiny_config(tiny_model_type)).save_pretrained(source)
    _assert_refused(invoke_cli("convert", str(source), "--out", str(tmp_path / "out")), tmp_path / "out", "post-norm")


def test_bad_layers_or_norms_flags(stock_dir, tmp_path):
    _assert_refused(invoke_cli("convert", str(stock_dir), "--out", str(tmp_path / "out"), "--layers", "model.nowhere"),
                    tmp_path / "out", "model.nowhere")
    _assert_refused(invoke_cli("convert", str(stock_dir), "--out", str(tmp_path / "out"), "--norms", "input_layernorm,nope"),
                    tmp_path / "out", "nope")


def test_ctrl_c_leaves_nothing(stock_dir, tmp_path, monkeypatch):
    from lns_surgery.conversion import convert as convert_module

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(convert_module.lns_layers, "write_custom_code", interrupted)
    with pytest.raises(KeyboardInterrupt):
        lns_surgery.convert(stock_dir, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_killed_process_leaves_no_checkpoint_at_out(stock_dir, tmp_path):
    """SIGKILL halfway (after the weights are copied, before the config is written)."""
    code = textwrap.dedent(f"""
        import os, signal
        import lns_surgery
        from lns_surgery.conversion import convert as convert_module
        convert_module.lns_layers.write_custom_code = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)
        lns_surgery.convert({str(stock_dir)!r}, {str(tmp_path / "out")!r})
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == -signal.SIGKILL
    assert not (tmp_path / "out").exists()
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != ".out.lns-lock"]  # the lock file stays too
    assert leftovers and all(name.startswith(".out.lns-tmp-") for name in leftovers)
    # The next run removes the dead run's leftover and says so.
    result = invoke_cli("convert", str(stock_dir), "--out", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    assert "removed 1 temporary folder(s)" in result.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


# --- architectures the registry does not know ---------------------------------------------------

_TOY_CONFIG = '''
from transformers import LlamaConfig


class ToyConfig(LlamaConfig):
    model_type = "toy_llama"
'''

_TOY_MODELING = '''
from transformers import LlamaForCausalLM, LlamaModel

from .configuration_toy import ToyConfig


class ToyModel(LlamaModel):
    config_class = ToyConfig


class ToyForCausalLM(LlamaForCausalLM):
    config_class = ToyConfig
'''


@pytest.fixture
def custom_code_checkpoint(tmp_path, stock_dir):
    """A checkpoint whose architecture exists only as code inside the folder (model_type toy_llama)."""
    folder = _copy(stock_dir, tmp_path, "toy")
    (folder / "configuration_toy.py").write_text(_TOY_CONFIG)
    (folder / "modeling_toy.py").write_text(_TOY_MODELING)
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="toy_llama", architectures=["ToyForCausalLM"], auto_map={
        "AutoConfig": "configuration_toy.ToyConfig",
        "AutoModel": "modeling_toy.ToyModel",
        "AutoModelForCausalLM": "modeling_toy.ToyForCausalLM",
    })
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_custom_code_input_needs_trust_remote_code(custom_code_checkpoint, tmp_path):
    out = tmp_path / "out"
    _assert_refused(invoke_cli("convert", str(custom_code_checkpoint), "--out", str(out)), out, "--trust-remote-code")
    result = invoke_cli("convert", str(custom_code_checkpoint), "--out", str(out), "--trust-remote-code")
    assert result.returncode == 0, result.stderr
    assert "not in the registry" in result.stderr and "input_layernorm, post_attention_layernorm" in result.stderr
    lns = json.loads((out / "config.json").read_text())["lns"]
    assert lns["layers"] == "model.layers" and lns["base_classes"]["AutoModelForCausalLM"] == "modeling_toy.ToyForCausalLM"

    stock = tiny_model("llama")
    ids = torch.tensor([[4, 9, 22, 31, 7]])
    with hooked_reference(stock, "llama"), torch.no_grad():
        torch.save(stock(input_ids=ids).logits, tmp_path / "reference.pt")
    result = run_fresh_python(
        """
        import torch
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained("out", trust_remote_code=True)
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([[4, 9, 22, 31, 7]])).logits
        print(type(model).__name__, (logits - torch.load("reference.pt")).abs().max().item())
        """,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    name, diff = result.stdout.split()[-2:]
    assert name == "LNSToyForCausalLM" and float(diff) <= 1e-5


def test_norms_stated_by_hand_give_the_attention_only_ablation(stock_dir, tmp_path):
    """--norms input_layernorm scales only the norm before attention (the paper's 'attention-only' row)."""
    result = invoke_cli("convert", str(stock_dir), "--out", str(tmp_path / "attn-only"), "--norms", "input_layernorm")
    assert result.returncode == 0, result.stderr
    model = lns_surgery.load_model(tmp_path / "attn-only")
    stock = tiny_model("llama")
    handles = [block.input_layernorm.register_forward_hook(lambda m, a, o, s=(i + 1) ** -0.5: o * s)
               for i, block in enumerate(stock.model.layers)]
    ids = torch.tensor([[4, 9, 22, 31, 7]])
    with torch.no_grad():
        reference = stock(input_ids=ids).logits
        assert (model(input_ids=ids).logits - reference).abs().max() <= 1e-5
    for handle in handles:
        handle.remove()
    assert os.path.exists(tmp_path / "attn-only" / "modeling_lns.py")


def test_load_model_names_a_broken_config_in_one_line(tmp_path):
    """The Python API as well as the CLI: broken JSON is an LNSError naming the file, not a JSONDecodeError."""
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "llama",', encoding="utf-8")
    with pytest.raises(LNSError, match="config.json' is not valid JSON"):
        lns_surgery.load_model(folder)


# --- records are re-proved, never trusted ---------------------------------------------------------


def _edit(folder, change):
    config = json.loads((folder / "config.json").read_text())
    change(config)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_fold_proves_its_rule_on_the_norm_classes_and_refuses_a_record_that_names_another(stock_dir, tmp_path):
    from test_zoo import hooked_logits
    from transformers import AutoModelForCausalLM

    lns_surgery.convert(stock_dir, tmp_path / "lns")
    for name, rule in (("edited", "one_plus"), ("legacy", None)):
        folder = tmp_path / name
        shutil.copytree(tmp_path / "lns", folder)
        _edit(folder, lambda c: c["lns"].update(fold_rule=rule) if rule else c["lns"].pop("fold_rule"))
    _assert_refused(invoke_cli("fold", str(tmp_path / "edited"), "--out", str(tmp_path / "out")), tmp_path / "out",
                    "by the rule 'one_plus', but that class's own math needs 'scale'")
    # A record that names no rule (schema 1) is folded by the rule the norm class proves.
    result = invoke_cli("fold", str(tmp_path / "legacy"), "--out", str(tmp_path / "folded"))
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "folded" / "config.json").read_text())["lns_folded"]["fold_rule"] == "scale"
    ids = {"input_ids": torch.tensor([[4, 9, 22, 31, 7]])}
    stock = tiny_model("llama")
    reference = hooked_logits(stock, "model.layers", ["input_layernorm", "post_attention_layernorm"], ids)
    folded = AutoModelForCausalLM.from_pretrained(tmp_path / "folded").eval()
    with torch.no_grad():
        assert (folded(**ids).logits - reference).abs().max() <= 1e-5


def test_gemma_record_that_claims_the_plain_rule_is_refused(tmp_path):
    tiny_model("gemma").save_pretrained(tmp_path / "gemma")
    lns_surgery.convert(tmp_path / "gemma", tmp_path / "lns")
    _edit(tmp_path / "lns", lambda c: c["lns"].update(fold_rule="scale"))
    _assert_refused(invoke_cli("fold", str(tmp_path / "lns"), "--out", str(tmp_path / "out")), tmp_path / "out",
                    "needs 'one_plus'")


@pytest.mark.parametrize("change, message", [
    (lambda c: c["lns_folded"].update(scales=[1.0, 0.5, 0.5, 0.5]), "gives block 2 the scale 0.5, but its alpha 1.0 gives"),
    (lambda c: c["lns_folded"].update(scales=[1.0, 0.7]), "lists 2 scales for the config's 4 blocks"),
    (lambda c: c["lns_folded"].update(scales=[1.0, 2.0, 0.5, 0.5]), "must lie in (0, 1]; block 2 has 2.0"),
    (lambda c: c["lns_folded"].update(scales=[1.0, "x", 0.5, 0.5]), "must be a list of finite numbers"),
    (lambda c: c["lns_folded"].update(scales=[1.0, float("nan"), 0.5, 0.5]), "must be a list of finite numbers"),
    (lambda c: c["lns_folded"].update(alpha=float("nan")), "must be a number from 0 to 1, got nan"),
    (lambda c: c["lns_folded"].update(fold_rule="shift"), "'lns_folded.fold_rule' must be one of scale, one_plus"),
    (lambda c: c["lns_folded"].update(rule="1/l"), "this tool knows only '1/sqrt(l)'"),
    (lambda c: c["lns_folded"].update(norms=["input_layernorm", "input_layernorm"]), "names a norm more than once"),
])
def test_every_reader_of_a_folded_record_validates_it(stock_dir, tmp_path, change, message):
    folder = _edit(lns_surgery.convert(stock_dir, tmp_path / "folded", mode="fold"), change)
    for argv in (["inspect", str(folder)], ["push", str(folder), "--repo-id", "tester/x", "--dry-run"],
                 ["analyze", str(folder), "--data", str(shared_path("data/tinyshakespeare/input.txt")),
                  "--out", str(tmp_path / "out"), "--max-tokens", "64", "--seq-len", "32", "--device", "cpu"]):
        result = invoke_cli(*argv)
        assert result.returncode == 2 and message in result.stderr, (argv[0], result.stderr)
        assert len([line for line in result.stderr.splitlines() if line.startswith("error: ")]) == 1
    assert not (tmp_path / "out").exists()


def test_recorded_scales_follow_the_modelling_rule():
    from lns_surgery.conversion.norm_math import FOLD_RULES
    from lns_surgery.core.lns_status import FOLD_RULE_NAMES, RULE, LNSStatus, expected_scale
    from lns_surgery.modeling import lns_layers
    from lns_surgery.modeling.lns_layers import layer_scale

    assert FOLD_RULE_NAMES == FOLD_RULES and RULE == lns_layers.RULE  # the record check knows what the code does
    for alpha in (0.0, 0.25, 1.0):
        assert [expected_scale(i, alpha) for i in range(6)] == [layer_scale(i, alpha) for i in range(6)]
    status = LNSStatus("lns-folded", {"alpha": 1.0, "scales": [1.0, 0.5 ** 0.5]})
    with pytest.raises(LNSError, match="lists 2 scales, but the model has 3 blocks"):
        status.scales(3)


def test_a_layer_count_that_is_not_the_weights_is_refused(stock_dir, tmp_path):
    for layers, message in ((3, "the weight files hold block 3 under 'model.layers' too (4 blocks in all)"),
                            (5, "hold no tensor of block 4 under 'model.layers'")):
        folder = _edit(_copy(stock_dir, tmp_path, f"claims-{layers}"), lambda c: c.update(num_hidden_layers=layers))
        for mode in ("code", "fold"):
            _assert_refused(invoke_cli("convert", str(folder), "--out", str(tmp_path / "out"), "--mode", mode),
                            tmp_path / "out", message)
    lns = lns_surgery.convert(stock_dir, tmp_path / "lns")
    _edit(lns, lambda c: c.update(num_hidden_layers=3))
    _assert_refused(invoke_cli("fold", str(lns), "--out", str(tmp_path / "out")), tmp_path / "out",
                    "the weight files hold block 3")


def test_weights_the_model_class_ignores_on_loading_are_not_counted_as_blocks(stock_dir, tmp_path, monkeypatch):
    """DeepSeek-V3 files keep a multi-token-prediction layer after the last block, which its class ignores."""
    from safetensors.torch import load_file, save_file
    from transformers import LlamaForCausalLM

    folder = _copy(stock_dir, tmp_path)
    tensors = load_file(folder / "model.safetensors")
    tensors["model.layers.4.input_layernorm.weight"] = torch.ones(32)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    _assert_refused(invoke_cli("convert", str(folder), "--out", str(tmp_path / "out")), tmp_path / "out", "block 4")
    monkeypatch.setattr(LlamaForCausalLM, "_keys_to_ignore_on_load_unexpected", [r"model\.layers\.4\."])
    assert invoke_cli("convert", str(folder), "--out", str(tmp_path / "out")).returncode == 0


def _copy_then(change):
    """checkpoint.copy_file, after which ``change`` alters the copy of a weight file: as if another
    program had rewritten or truncated the source while it was read."""
    from lns_surgery.core import checkpoint

    original = checkpoint.copy_file

    def copy_file(source, target, link="auto"):
        how = original(source, target, link="copy")
        if target.name.endswith(".safetensors"):
            change(target)
        return how

    return copy_file


def _truncate(path):
    with open(path, "r+b") as handle:
        handle.truncate(path.stat().st_size - 100)


def _rename_a_tensor(path):
    """The same size and a valid header, naming another tensor: the source was replaced mid-copy."""
    import struct

    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    header = data[8:8 + length].replace(b"model.norm.weight", b"model.norm.wEight")
    path.write_bytes(data[:8] + header + data[8 + length:])


@pytest.mark.parametrize("change, message", [(_truncate, "it had"), (_rename_a_tensor, "its tensors are not the ones")])
def test_a_shard_that_changes_during_the_copy_is_refused(stock_dir, tmp_path, monkeypatch, change, message):
    from lns_surgery.core import checkpoint

    monkeypatch.setattr(checkpoint, "copy_file", _copy_then(change))
    for argv in (["convert", str(stock_dir)], ["convert", str(stock_dir), "--mode", "fold"]):
        _assert_refused(invoke_cli(*argv, "--out", str(tmp_path / "out")), tmp_path / "out",
                        "'model.safetensors' changed while it was being copied", message)
    monkeypatch.undo()
    lns = lns_surgery.convert(stock_dir, tmp_path / "lns")
    monkeypatch.setattr(checkpoint, "copy_file", _copy_then(change))
    _assert_refused(invoke_cli("fold", str(lns), "--out", str(tmp_path / "out")), tmp_path / "out", "changed while")


def test_fold_of_a_config_with_a_field_of_the_wrong_type_is_one_line(stock_dir, tmp_path):
    lns = _edit(lns_surgery.convert(stock_dir, tmp_path / "lns"), lambda c: c.update(num_hidden_layers="4"))
    _assert_refused(invoke_cli("fold", str(lns), "--out", str(tmp_path / "out")), tmp_path / "out",
                    "could not read the model config", "expected int, got str")


def test_a_symbolic_link_loop_in_the_input_is_one_line(stock_dir, tmp_path):
    source = _copy(stock_dir, tmp_path)
    (source / "a").symlink_to(source / "b")
    (source / "b").symlink_to(source / "a")
    _assert_refused(invoke_cli("convert", str(source), "--out", str(tmp_path / "out")), tmp_path / "out",
                    "is a symbolic link that never reaches a file (a loop)")


def test_a_config_that_is_a_json_list_is_one_line(stock_dir, tmp_path):
    source = _copy(stock_dir, tmp_path)
    (source / "config.json").write_text("[1, 2]")
    for argv in (["convert", str(source)], ["fold", str(source)]):
        _assert_refused(invoke_cli(*argv, "--out", str(tmp_path / "out")), tmp_path / "out",
                        "holds a JSON list, not an object of settings")
