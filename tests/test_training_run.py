"""End-to-end training on CPU with the real pretrained stories260K: LoRA SFT with a merged export,
healing with the LNS ramp, resume after a kill, from-scratch models, and the errors users meet."""

from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
from click.testing import CliRunner
from transformers import TrainerCallback

from conftest import REPO_ROOT, run_cli, run_fresh_python, shared_path
from lns_surgery.core.errors import LNSError
from lns_surgery.training.callbacks import ramp_alpha
from lns_surgery.training.recipe import recipe_from_dict
from lns_surgery.training.run import build_trainer, train, train_from_dict

IDS = [1, 403, 407, 261, 378, 275, 261, 1181 % 512, 29, 13]  # BOS first: the tokenizer does not add it


class Snapshot(TrainerCallback):
    """Copies the trainable parameters before training, to check afterwards that each one moved."""

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    def on_train_end(self, args, state, control, model=None, **kwargs):
        params = dict(model.named_parameters())  # before any LoRA merge renames them
        self.unchanged = [n for n, before in self.before.items() if torch.equal(params[n].detach(), before)]


def _logits(model, ids=IDS):
    model.eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


def _fresh_logits(path, ids=IDS):
    """Logits of ``path`` loaded by plain transformers with remote code, in a new interpreter."""
    result = run_fresh_python(f"""
        import json, torch
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(path)!r}, trust_remote_code=True).eval()
        with torch.no_grad():
            logits = model(torch.tensor([{ids!r}])).logits[0]
        print(json.dumps({{"class": type(model).__name__, "alpha": model.config.lns["alpha"], "logits": logits.tolist()}}))
    """)
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    out["logits"] = torch.tensor(out["logits"])
    return out


def _base(stories_path, tmp_path, **extra):
    return {"model_name_or_path": str(stories_path), "lns_convert": True, "output_dir": str(tmp_path / "out"),
            "activation_checkpointing": False, "use_cpu": True, "report_to": "none", "disable_tqdm": True,
            "seed": 0, **extra}


@pytest.mark.floor
@pytest.mark.slow
def test_lora_sft_merged_export(stories_path, tmp_path):
    alpaca = shared_path("data/alpaca/alpaca_first100.json")
    snapshot = Snapshot()
    settings = _base(stories_path, tmp_path, dataset_name=str(alpaca), eval_fraction=0.1, max_length=128,
                     max_steps=12, per_device_train_batch_size=8, per_device_eval_batch_size=16,
                     learning_rate=1e-2, lora_r=8, lora_alpha=16, lora_dropout=0.0, train_norms=True,
                     eval_on_start=True, eval_strategy="steps", eval_steps=5, logging_steps=3)
    result = train_from_dict(settings, "sft", callbacks=[snapshot])
    out = result.output_dir

    # evaluated at the start, every 5 steps and after the last step, each once: the run's final
    # metrics are the Trainer's own evaluation after step 12, not a second pass over the split
    evaluations = [e for e in result.metrics["log_history"] if "eval_loss" in e]
    assert [e["step"] for e in evaluations] == [0, 5, 10, 12]
    assert result.metrics["eval"]["eval_loss"] == evaluations[-1]["eval_loss"]

    # every trainable parameter (LoRA matrices and the norm copies) moved; the norms were trainable
    assert snapshot.before and not snapshot.unchanged
    assert any("norm" in name for name in snapshot.before)

    # the loss went down on held-out data
    history = result.metrics["log_history"]
    first_eval = next(e["eval_loss"] for e in history if "eval_loss" in e)
    assert result.metrics["eval"]["eval_loss"] < first_eval
    assert math.isclose(result.metrics["eval"]["eval_perplexity"], math.exp(result.metrics["eval"]["eval_loss"]))
    assert [e["step"] for e in history] == sorted(e["step"] for e in history)

    # outputs: adapter, merged standalone LNS checkpoint with its code, metrics, recipe; no leftovers
    assert (out / "adapter" / "adapter_config.json").is_file()
    # converted on load: the adapter's base is the LNS conversion written beside it, never the stock input
    adapter_config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str((out / "base").resolve())
    assert json.loads((out / "base" / "config.json").read_text())["lns"]["alpha"] == 1.0
    peft = run_fresh_python(f"""
        import json, torch
        from peft import AutoPeftModelForCausalLM
        model = AutoPeftModelForCausalLM.from_pretrained({str(out / "adapter")!r}, trust_remote_code=True).eval()
        with torch.no_grad():
            print(json.dumps(model(torch.tensor([{IDS!r}])).logits[0].tolist()))
    """)
    assert peft.returncode == 0, peft.stderr[-3000:]
    torch.testing.assert_close(torch.tensor(json.loads(peft.stdout.strip().splitlines()[-1])), _logits(result.model),
                               atol=1e-5, rtol=1e-5)
    assert {"lns_layers.py", "modeling_lns.py", "configuration_lns.py", "model.safetensors"} <= {p.name for p in out.iterdir()}
    assert not out.with_name(out.name + ".incomplete").exists()
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["log_history"] == json.loads(json.dumps(history))
    assert metrics["train"]["tokens_seen"] > 0 and metrics["train"]["train_tokens_per_second"] > 0
    assert metrics["train"]["global_step"] == 12
    # steady state: the 11 steps after the first, evaluation left out; no MFU without a known GPU peak
    assert metrics["train"]["steady_steps"] == 11 and metrics["train"]["steady_tokens_per_second"] > 0
    assert metrics["train"]["mfu"] is None and metrics["train"]["peak_host_memory_gb"] > 0.1
    assert metrics["train"]["attn_implementation"] == "sdpa"  # the model's default: nothing packs here
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "lns_llama" and config["lns"]["alpha"] == 1.0 and config["auto_map"]

    # a fresh process with only transformers computes what the merged model in memory computes
    fresh = _fresh_logits(out)
    assert fresh["class"] == "LNSLlamaForCausalLM"
    torch.testing.assert_close(fresh["logits"], _logits(result.model), atol=1e-5, rtol=1e-5)
    # and it is not the model we started from
    from lns_surgery import apply_layernorm_scaling, load_model

    start = apply_layernorm_scaling(load_model(str(stories_path)))
    assert not torch.allclose(_logits(start), fresh["logits"], atol=1e-3)

    # the saved recipe reproduces the settings
    from lns_surgery.training.recipe import parse_recipe

    again = parse_recipe([], "sft", out / "recipe.yaml")
    assert again.model.lora_r == 8 and again.args.train_norms and again.training.max_steps == 12


@pytest.mark.slow
def test_chat_lora_exports_with_its_template(stories_path, tmp_path):
    chat = shared_path("data/dolly-chat/dolly_2k_chat.jsonl")
    settings = _base(stories_path, tmp_path, dataset_name=str(chat), assistant_only_loss=True, max_train_samples=64,
                     max_length=128, max_steps=4, per_device_train_batch_size=8, learning_rate=1e-2,
                     lora_r=4, lora_dropout=0.0, export="merged")
    result = train_from_dict(settings, "sft")
    out = result.output_dir
    assert not (out / "adapter").exists()  # export: merged
    assert "generation %}" in json.loads((out / "tokenizer_config.json").read_text()).get("chat_template", "") or \
        "generation %}" in (out / "chat_template.jinja").read_text()  # the template ships with the model
    fresh = _fresh_logits(out)
    torch.testing.assert_close(fresh["logits"], _logits(result.model), atol=1e-5, rtol=1e-5)


class RampProbe(TrainerCallback):
    """Records the alpha each optimizer step runs with, and the live model's logits at each save."""

    def __init__(self):
        self.alpha_during_step, self.logits_at_save = [], {}

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        self.alpha_during_step.append(model.config.lns["alpha"])

    def on_save(self, args, state, control, model=None, **kwargs):
        self.logits_at_save[state.global_step] = (model.config.lns["alpha"], _logits(model).clone())
        model.train()


@pytest.mark.slow
def test_healing_with_ramp_and_mid_ramp_checkpoint(stories_path, tmp_path):
    c4 = shared_path("data/c4-sample/c4_sample300.jsonl")
    probe, snapshot = RampProbe(), Snapshot()
    settings = _base(stories_path, tmp_path, dataset_name=str(c4), lns_ramp_steps=4, max_steps=6, max_length=64,
                     per_device_train_batch_size=4, learning_rate=3e-3, logging_steps=1, save_strategy="steps",
                     save_steps=2)
    result = train_from_dict(settings, "pretrain", callbacks=[probe, snapshot])
    out = result.output_dir

    # optimizer step k runs with alpha (k-1)/4: it starts from the original function and ends at full LNS
    assert probe.alpha_during_step == [0.0, 0.25, 0.5, 0.75, 1.0, 1.0]
    logged = [e["lns_alpha"] for e in result.metrics["log_history"] if "loss" in e]
    assert logged == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert json.loads((out / "config.json").read_text())["lns"]["alpha"] == 1.0
    assert not snapshot.unchanged  # full fine-tuning: every weight, norms and embeddings too

    # the mid-ramp checkpoint stores the alpha reached and reloads computing what was being trained
    checkpoint = out / "checkpoints" / "checkpoint-2"
    assert json.loads((checkpoint / "config.json").read_text())["lns"]["alpha"] == 0.5
    alpha, live = probe.logits_at_save[2]
    fresh = _fresh_logits(checkpoint)
    assert alpha == fresh["alpha"] == 0.5
    torch.testing.assert_close(fresh["logits"], live, atol=1e-5, rtol=1e-5)
    # which is not the full-LNS function of the same weights
    from lns_surgery import load_model

    full = load_model(str(checkpoint))
    full.set_lns_alpha(1.0)
    assert not torch.allclose(_logits(full), live, atol=1e-3)


def test_ramp_schedule_stores_the_alpha_reached():
    assert [ramp_alpha(step, 8) for step in (0, 2, 6, 8, 20)] == [0.0, 0.25, 0.75, 1.0, 1.0]
    assert ramp_alpha(5, 0) == 1.0


_KILLED_RUN = """
import os, signal, sys
from transformers import TrainerCallback
from lns_surgery.training.recipe import parse_recipe
from lns_surgery.training.run import train

class KillAfterSave(TrainerCallback):
    def on_save(self, args, state, control, **kwargs):
        if state.global_step == 4:
            os.kill(os.getpid(), signal.SIGKILL)   # as hard as a pre-empted machine

train(parse_recipe(sys.argv[2:], "pretrain", sys.argv[1]), callbacks=[KillAfterSave()])
"""


@pytest.mark.slow
def test_resume_after_kill(stories_path, tmp_path):
    recipe = REPO_ROOT / "recipes" / "cpu" / "pretrain-c4-tiny.yaml"
    out = tmp_path / "healed"
    flags = ["--model_name_or_path", str(stories_path), "--output_dir", str(out),
             "--dataset_name", str(shared_path("data/c4-sample/c4_sample300.jsonl")),
             "--max_steps", "8", "--save_steps", "2", "--eval_steps", "4", "--lns_ramp_steps", "6",
             "--max_length", "64", "--max_eval_samples", "4", "--logging_steps", "1", "--disable_tqdm", "true"]
    killed = subprocess.run([sys.executable, "-c", textwrap.dedent(_KILLED_RUN), str(recipe), *flags],
                            capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    work = out.with_name("healed.incomplete")
    assert not out.exists()  # nothing final before training completes
    assert sorted(p.name for p in work.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]

    resumed = run_cli("pretrain", "--recipe", str(recipe), *flags, "--resume", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"wrote {out} (8 steps" in resumed.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["train"]["global_step"] == 8
    steps = [e["step"] for e in metrics["log_history"] if "loss" in e]
    assert steps == list(range(1, 9))  # the killed run's log entries come back with the checkpoint
    alphas = [e["lns_alpha"] for e in metrics["log_history"] if "loss" in e]
    assert alphas == [min(1.0, s / 6) for s in range(1, 9)]
    assert sorted(p.name for p in (out / "checkpoints").iterdir())[-1] == "checkpoint-8"
    assert not work.exists()


def test_refuses_to_clobber(stories_path, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    settings = _base(stories_path, tmp_path, dataset_name="x.jsonl")
    with pytest.raises(LNSError, match="already exists; pass --overwrite"):
        train_from_dict(settings, "sft")
    out.rmdir()
    (tmp_path / "out.incomplete").mkdir()
    (tmp_path / "out.incomplete" / "checkpoint-1").mkdir()
    with pytest.raises(LNSError, match="interrupted run left .*--resume"):
        train_from_dict(settings, "sft")


def test_qlora_without_gpu_is_a_clear_error(stories_path, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    settings = _base(stories_path, tmp_path, dataset_name=str(shared_path("data/alpaca/alpaca_first100.json")),
                     load_in_4bit=True, max_steps=1)
    with pytest.raises(LNSError, match="QLoRA .* needs a CUDA GPU"):
        build_trainer(recipe_from_dict(settings, "sft"))


def test_ramp_needs_an_lns_model(stories_path, tmp_path):
    settings = _base(stories_path, tmp_path, dataset_name=str(shared_path("data/c4-sample/c4_sample300.jsonl")),
                     lns_convert=False, lns_ramp_steps=5)
    with pytest.raises(LNSError, match="lns_ramp_steps needs an LNS model"):
        build_trainer(recipe_from_dict(settings, "pretrain"))


# --- from-scratch models ----------------------------------------------------------------------------


def test_presets_have_the_papers_shapes():
    from lns_surgery.training.models import PRESETS, preset_config

    expected = {"llama-130m": (12, 768, 2048, 12), "llama-250m": (24, 768, 2560, 16),
                "llama-350m": (24, 1024, 2736, 16), "llama-1b": (24, 2048, 5461, 32)}
    assert set(PRESETS) == set(expected)
    for name, (layers, hidden, ffn, heads) in expected.items():
        config = preset_config(name)
        assert (config.num_hidden_layers, config.hidden_size, config.intermediate_size,
                config.num_attention_heads) == (layers, hidden, ffn, heads)
        assert config.rms_norm_eps == 1e-6 and config.initializer_range == 0.02 and config.vocab_size == 32000
    with torch.device("meta"):
        from transformers import LlamaForCausalLM

        count = sum(p.numel() for p in LlamaForCausalLM(preset_config("llama-130m")).parameters())
    assert 130e6 < count < 140e6  # "130M" counts the transformer; both untied 32000 x 768 embeddings add the rest


def test_init_writes_lns_and_baseline_checkpoints(stories_path, tmp_path):
    from lns_surgery.cli import main

    config = tmp_path / "tiny.json"
    config.write_text(json.dumps({"num_hidden_layers": 3, "hidden_size": 32, "intermediate_size": 64,
                                  "num_attention_heads": 4, "num_key_value_heads": 4}))
    runner = CliRunner()
    lns = runner.invoke(main, ["init", "--config", str(config), "--tokenizer", str(stories_path),
                               "--out", str(tmp_path / "lns")])
    assert lns.exit_code == 0, lns.output
    baseline = runner.invoke(main, ["init", "--config", str(config), "--tokenizer", str(stories_path),
                                    "--out", str(tmp_path / "preln"), "--no-lns"])
    assert baseline.exit_code == 0, baseline.output
    again = runner.invoke(main, ["init", "llama-130m", "--out", str(tmp_path / "lns")])
    assert again.exit_code == 2 and "already exists" in again.output
    unknown = runner.invoke(main, ["init", "llama-7b", "--out", str(tmp_path / "x")])
    assert unknown.exit_code == 2 and "unknown preset 'llama-7b'" in unknown.output and not (tmp_path / "x").exists()

    lns_config = json.loads((tmp_path / "lns" / "config.json").read_text())
    assert lns_config["model_type"] == "lns_llama" and lns_config["vocab_size"] == 512
    assert (tmp_path / "lns" / "tokenizer.json").is_file()
    assert json.loads((tmp_path / "preln" / "config.json").read_text())["model_type"] == "llama"

    fresh = _fresh_logits(tmp_path / "lns")
    assert fresh["class"] == "LNSLlamaForCausalLM" and fresh["alpha"] == 1.0
    # plain normal init, std 0.02, and the same weights whether LNS or not (same seed)
    from safetensors.torch import load_file

    lns_weights = load_file(tmp_path / "lns" / "model.safetensors")
    q = lns_weights["model.layers.2.self_attn.q_proj.weight"]
    assert abs(q.std().item() - 0.02) < 0.003
    o = lns_weights["model.layers.2.self_attn.o_proj.weight"]
    assert abs(o.std().item() - 0.02) < 0.003  # no depth-scaled output init
    baseline_weights = load_file(tmp_path / "preln" / "model.safetensors")
    assert torch.equal(baseline_weights["model.layers.2.mlp.up_proj.weight"], lns_weights["model.layers.2.mlp.up_proj.weight"])


@pytest.mark.slow
def test_pretrain_from_scratch_model(stories_path, tmp_path):
    from lns_surgery.training.models import init_model

    start = init_model(None, tmp_path / "scratch", tokenizer=stories_path,
                       config={"num_hidden_layers": 2, "hidden_size": 32, "intermediate_size": 64,
                               "num_attention_heads": 4})
    settings = _base(stories_path, tmp_path, model_name_or_path=str(start), lns_convert=False,
                     dataset_name=str(shared_path("data/c4-sample/c4_sample300.jsonl")), max_steps=8,
                     max_length=64, per_device_train_batch_size=4, learning_rate=1e-2, logging_steps=1)
    result = train_from_dict(settings, "pretrain")
    losses = [e["loss"] for e in result.metrics["log_history"] if "loss" in e]
    assert losses[-1] < losses[0] - 0.3  # random init: the loss falls fast
    assert json.loads((result.output_dir / "config.json").read_text())["lns"]["alpha"] == 1.0


def test_python_api_with_recipe_parts(stories_path, tmp_path):
    """``train(args, sft_config, model_config)`` as a notebook would call it; 2 steps of full fine-tuning."""
    recipe = recipe_from_dict(_base(stories_path, tmp_path, use_peft=False, max_steps=2, max_length=64,
                                    dataset_name=str(shared_path("data/c4-sample/c4_sample300.jsonl")),
                                    per_device_train_batch_size=2), "pretrain")
    result = train(recipe.args, recipe.training, recipe.model, command="pretrain")
    assert result.metrics["train"]["global_step"] == 2
    assert type(result.model).__name__ == "LNSLlamaForCausalLM"
    assert result.tokenizer.pad_token is not None and (result.output_dir / "metrics.json").is_file()
