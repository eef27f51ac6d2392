"""Converting real checkpoints through the CLI: the pretrained stories260K Llama, sharded
checkpoints, fold mode, inspect and archs."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from conftest import REPO_ROOT, run_cli, run_fresh_python
from tiny_models import tiny_model

import lns_surgery

STORY = "Once upon a time, there was a little girl named Lily. She loved to play outside in the park."


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _greedy(model, tokenizer, steps=30):
    ids = torch.tensor([[1]])  # the tokenizer does not add BOS by itself
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=steps, do_sample=False)
    return tokenizer.decode(out[0], skip_special_tokens=True)


@pytest.mark.floor
def test_stories260k_converts_and_loads_in_a_fresh_process(stories_path, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = AutoModelForCausalLM.from_pretrained(stories_path).eval()
    tokenizer = AutoTokenizer.from_pretrained(stories_path)
    assert _greedy(base, tokenizer).startswith(STORY[:60]), "the shared checkpoint is not the documented one"

    out = tmp_path / "stories-lns"
    result = run_cli("convert", str(stories_path), "--out", str(out))
    assert result.returncode == 0, result.stderr
    # Everything else is carried over; the weights are byte-identical.
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "model.safetensors"):
        assert _sha(out / name) == _sha(stories_path / name), name
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "lns_llama"
    assert config["architectures"] == ["LNSLlamaForCausalLM"]
    lns = config["lns"]
    assert lns["rule"] == "1/sqrt(l)" and lns["alpha"] == 1.0 and lns["schema_version"] == 2 and lns["fold_rule"] == "scale"
    assert lns["layers"] == "model.layers" and lns["norms"] == ["input_layernorm", "post_attention_layernorm"]
    # a local source is recorded by its folder's name: the path of this machine is not published with it
    assert lns["source"] == {"model": stories_path.name, "revision": None, "local": True} and lns["tool_version"]
    assert set(config["auto_map"]) >= {"AutoConfig", "AutoModel", "AutoModelForCausalLM"}
    for code_file in ("lns_layers.py", "configuration_lns.py", "modeling_lns.py"):
        source = (out / code_file).read_text()
        imports = {line.split()[1].split(".")[0] for line in source.splitlines() if line.startswith(("import ", "from "))}
        assert imports <= {"torch", "transformers", "__future__", "copy", "json", "math", "os", "shutil", ""}, (code_file, imports)

    ids = torch.tensor([[1, 403, 407, 261, 378, 2]])
    torch.save(ids, tmp_path / "ids.pt")
    with torch.no_grad():
        torch.save(lns_surgery.load_model(out)(input_ids=ids).logits, tmp_path / "expected.pt")
        torch.save(base(input_ids=ids).logits, tmp_path / "base.pt")
    script = """
        import json, torch
        from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer
        path = "stories-lns"
        config = AutoConfig.from_pretrained(path, trust_remote_code=True)
        bare = AutoModel.from_pretrained(path, trust_remote_code=True)
        model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True).eval()
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=True)
        ids = torch.load("ids.pt")
        with torch.no_grad():
            logits = model(input_ids=ids).logits
        try:
            AutoModelForCausalLM.from_pretrained(path)
            without_trust = "loaded"
        except Exception as exc:
            without_trust = str(exc)
        print()  # the refused load above leaves its prompt on stdout
        print(json.dumps({
            "classes": [type(config).__name__, type(bare).__name__, type(model).__name__],
            "diff_expected": (logits - torch.load("expected.pt")).abs().max().item(),
            "diff_base": (logits - torch.load("base.pt")).abs().max().item(),
            "tokens": tokenizer("Once upon a time")["input_ids"],
            "without_trust": without_trust,
        }))
    """
    result = run_fresh_python(script, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["classes"] == ["LNSLlamaConfig", "LNSLlamaModel", "LNSLlamaForCausalLM"]
    # Equal up to float reassociation: bitwise equality across processes holds only while no earlier test
    # in this worker has changed torch's kernel choices.
    assert report["diff_expected"] <= 1e-4
    assert report["diff_base"] > 0.1, "the scaling must be active"
    assert report["tokens"] == tokenizer("Once upon a time")["input_ids"]
    assert "trust_remote_code" in report["without_trust"], "without trust_remote_code it must fail, never load the stock class"


def test_stories260k_fold_matches_code_mode(stories_path, tmp_path):
    from transformers import AutoModelForCausalLM

    assert run_cli("convert", str(stories_path), "--out", str(tmp_path / "lns")).returncode == 0
    result = run_cli("fold", str(tmp_path / "lns"), "--out", str(tmp_path / "folded"))
    assert result.returncode == 0, result.stderr
    folded_config = json.loads((tmp_path / "folded" / "config.json").read_text())
    assert folded_config["model_type"] == "llama" and "auto_map" not in folded_config
    assert folded_config["lns_folded"]["scales"][4] == pytest.approx(1 / 5**0.5)
    assert not (tmp_path / "folded" / "modeling_lns.py").exists()
    ids = torch.tensor([[1, 403, 407, 261, 378]])
    with torch.no_grad():
        code = lns_surgery.load_model(tmp_path / "lns")(input_ids=ids).logits
        folded = AutoModelForCausalLM.from_pretrained(tmp_path / "folded")(input_ids=ids).logits
    assert (code - folded).abs().max() <= 1e-5
    # A folded checkpoint is never converted again.
    again = run_cli("convert", str(tmp_path / "folded"), "--out", str(tmp_path / "twice"))
    assert again.returncode != 0 and "twice" in again.stderr and not (tmp_path / "twice").exists()


def test_sharded_checkpoint_keeps_shards_and_index(tmp_path):
    stock = tiny_model("qwen2")
    stock.save_pretrained(tmp_path / "stock", max_shard_size="40KB")
    shards = sorted(p.name for p in (tmp_path / "stock").glob("*.safetensors"))
    assert len(shards) > 2
    lns_surgery.convert(tmp_path / "stock", tmp_path / "lns")
    lns_surgery.convert(tmp_path / "stock", tmp_path / "folded", mode="fold")
    for name in [*shards, "model.safetensors.index.json"]:
        assert _sha(tmp_path / "lns" / name) == _sha(tmp_path / "stock" / name), name
    assert sorted(p.name for p in (tmp_path / "folded").glob("*.safetensors")) == shards
    ids = torch.randint(3, 100, (1, 9))
    with torch.no_grad():
        code = lns_surgery.load_model(tmp_path / "lns")(input_ids=ids).logits
        from transformers import AutoModelForCausalLM

        folded = AutoModelForCausalLM.from_pretrained(tmp_path / "folded")(input_ids=ids).logits
    assert (code - folded).abs().max() <= 1e-5


def test_fold_of_bf16_gemma_is_done_in_fp32(tmp_path):
    """Gemma stores w with 1 + w applied: c * (1 + w) - 1 must be computed in fp32, then cast."""
    stock = tiny_model("gemma").to(torch.bfloat16)
    stock.save_pretrained(tmp_path / "stock")
    lns_surgery.convert(tmp_path / "stock", tmp_path / "folded", mode="fold")
    from safetensors import safe_open

    name = "model.layers.3.input_layernorm.weight"
    with safe_open(tmp_path / "stock" / "model.safetensors", "pt") as f:
        original = f.get_tensor(name)
    with safe_open(tmp_path / "folded" / "model.safetensors", "pt") as f:
        folded = f.get_tensor(name)
    assert folded.dtype == torch.bfloat16
    expected = (0.5 * (1 + original.float()) - 1).to(torch.bfloat16)
    assert torch.equal(folded, expected)


def test_inspect_and_archs(stories_path, tmp_path):
    result = run_cli("inspect", str(stories_path), "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["status"] == "stock" and report["num_layers"] == 5 and report["architecture_from"] == "registry"
    assert report["scales"] == pytest.approx([1 / (i + 1) ** 0.5 for i in range(5)])
    lns_surgery.convert(stories_path, tmp_path / "lns", alpha=0.5)
    report = json.loads(run_cli("inspect", str(tmp_path / "lns"), "--json").stdout)
    assert report["status"] == "lns" and report["alpha"] == 0.5
    assert report["scales"][3] == pytest.approx(0.75)
    text = run_cli("inspect", str(tmp_path / "lns")).stdout
    assert "LNS checkpoint, alpha=0.5" in text and "0.750000" in text

    archs = run_cli("archs")
    assert archs.returncode == 0
    for model_type in ("llama", "qwen3_moe", "gemma3_text", "gpt2", "olmo", "olmo2"):
        assert model_type in archs.stdout


def test_readme_architecture_table_is_current():
    from lns_surgery.conversion.registry import architecture_table

    readme = (REPO_ROOT / "docs" / "architectures.md").read_text()
    start, end = readme.index("<!-- archs:start -->"), readme.index("<!-- archs:end -->")
    assert readme[start:end].split("\n", 1)[1].strip() == architecture_table().strip(), (
        "docs/architectures.md table is stale: regenerate it with `lns-surgery archs --markdown`"
    )


def test_in_process_loading_needs_no_remote_code(stories_path, tmp_path):
    from transformers import AutoModelForCausalLM

    lns_surgery.convert(stories_path, tmp_path / "lns")
    lns_surgery.register_auto_classes()
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "lns")  # no trust_remote_code
    assert type(model).__module__ == "lns_surgery.modeling.auto" and type(model).__name__ == "LNSLlamaForCausalLM"
    assert model.model.layers[4].post_attention_layernorm.lns_scale == pytest.approx(1 / 5**0.5)


def test_lns_models_describe_their_own_layout_and_builtins_load():
    from lns_surgery.conversion.apply import architecture_for_model

    model = lns_surgery.load_model("builtin:tiny-llama")
    assert not lns_surgery.is_lns_model(model)
    lns_surgery.apply_layernorm_scaling(model)
    arch = architecture_for_model(model)
    assert (arch.model_type, arch.layers, arch.norms) == ("llama", "model.layers", ("input_layernorm", "post_attention_layernorm"))
