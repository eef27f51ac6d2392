"""Recipes: TrlParser into RecipeArguments + SFTConfig + ModelConfig, flags over YAML, readable errors,
every shipped recipe parses, and the training commands' CLI surface. Nothing here trains a model."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from lns_surgery.cli import main
from lns_surgery.core.errors import LNSError
from lns_surgery.training.recipe import RENAMED_KEYS, _installed_names, _parser, parse_recipe, recipe_from_dict

REPO = Path(__file__).resolve().parent.parent
RECIPES = sorted(p for p in (REPO / "recipes").rglob("*.yaml") if "accelerate" not in p.parts)
ACCELERATE = sorted((REPO / "recipes" / "accelerate").glob("*.yaml"))

# Parsing depends on the fields TRL and transformers define, which change between versions.
pytestmark = pytest.mark.floor


def _write(tmp_path, text: str, name: str = "recipe.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def _command_of(recipe: Path) -> str:
    # every shipped recipe starts with the command that runs it: "# lns-surgery sft --recipe ..."
    words = recipe.read_text(encoding="utf-8").splitlines()[0].split()
    assert words[:2] == ["#", "lns-surgery"], f"{recipe} must start with '# lns-surgery <command> --recipe ...'"
    return words[2]


def test_yaml_fills_all_three_dataclasses_and_flags_override_it(tmp_path):
    path = _write(tmp_path, "model_name_or_path: some/model\nlearning_rate: 1.0e-3\nlora_r: 4\n"
                            "lns_ramp_steps: 7\ndataset_name: d.jsonl\noutput_dir: out\n")
    recipe = parse_recipe(["--learning_rate", "5e-5", "--lns_ramp_steps", "3"], "sft", path)
    assert recipe.training.learning_rate == 5e-5  # the flag wins
    assert recipe.args.lns_ramp_steps == 3
    assert recipe.model.lora_r == 4  # from the YAML
    assert recipe.model.model_name_or_path == "some/model"
    assert recipe.args.dataset_name == "d.jsonl"
    assert recipe.training.output_dir == "out"


def test_command_defaults(tmp_path):
    sft = recipe_from_dict({"output_dir": "x"}, "sft")
    pretrain = recipe_from_dict({"output_dir": "x"}, "pretrain")
    assert sft.model.use_peft and sft.model.lora_target_modules == "all-linear"
    assert not pretrain.model.use_peft and pretrain.training.packing and pretrain.args.dataset_format == "text"
    import torch

    if not torch.cuda.is_available():
        assert sft.training.bf16 is False  # TRL's default (True) fails on CPU
    assert sft.training.include_num_input_tokens_seen == "non_padding"
    # a recipe's own value beats the command's default
    assert recipe_from_dict({"use_peft": False}, "sft").model.use_peft is False


def test_unknown_yaml_key_is_named(tmp_path):
    path = _write(tmp_path, "model_name_or_path: m\nlearning_rat: 0.1\n")
    with pytest.raises(LNSError, match="unknown key in recipe .*: learning_rat$"):
        parse_recipe([], "sft", path)


def test_unknown_flag_and_bad_value(tmp_path):
    with pytest.raises(LNSError, match="unknown option --lora_rank"):
        parse_recipe(["--lora_rank", "4"], "sft")
    with pytest.raises(LNSError, match="learning_rate.*invalid float value: 'fast'"):
        parse_recipe(["--learning_rate", "fast"], "sft")
    with pytest.raises(LNSError, match="unknown recipe key: bogus"):
        recipe_from_dict({"bogus": 1})


@pytest.mark.parametrize("text, message", [
    ("- a\n- b\n", "must be a YAML mapping of keys to values, not a list"),
    ("just a string\n", "must be a YAML mapping of keys to values, not a str"),
    ("a: [unclosed\n", "is not valid YAML"),
    # PyYAML alone keeps the last of repeated keys without a word
    ("learning_rate: 1.0e-3\nmax_steps: 3\nlearning_rate: 2.0e-3\n",
     "the key 'learning_rate' appears twice, on lines 1 and 3"),
])
def test_recipe_that_is_not_a_mapping_fails_readably(tmp_path, text, message):
    with pytest.raises(LNSError, match=message):
        parse_recipe([], "sft", _write(tmp_path, text))


def test_missing_recipe(tmp_path):
    with pytest.raises(LNSError, match="not found"):
        parse_recipe([], "sft", tmp_path / "nope.yaml")


def test_env_block_is_exported(tmp_path, monkeypatch):
    monkeypatch.delenv("LNS_TEST_ENV_VALUE", raising=False)
    path = _write(tmp_path, "env:\n  LNS_TEST_ENV_VALUE: 42\nmodel_name_or_path: m\n")
    parse_recipe([], "sft", path)
    import os

    assert os.environ["LNS_TEST_ENV_VALUE"] == "42"
    monkeypatch.delenv("LNS_TEST_ENV_VALUE")


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_shipped_recipe_parses(recipe):
    import torch

    command = _command_of(recipe)
    assert command in ("sft", "pretrain")
    data = yaml.safe_load(recipe.read_text(encoding="utf-8"))
    # transformers refuses bf16 on a machine without a GPU unless told the run is on the CPU
    on_cpu = ["--use_cpu", "true"] if data.get("bf16") and not torch.cuda.is_available() else []
    parsed = parse_recipe(on_cpu, command, recipe)
    assert parsed.args.dataset_name and parsed.training.output_dir
    assert parsed.model.model_name_or_path or parsed.args.init_preset
    installed = _installed_names(_parser())
    for key, value in data.items():  # every key took effect on one of the three parts
        key = installed.get(key, key)
        part = next(p for p in parsed.as_tuple() if hasattr(p, key))
        got = getattr(part, key)
        if isinstance(value, (int, float, str, bool)) and not isinstance(got, (list, dict)):
            assert str(getattr(got, "value", got)) == str(value) or got == value, key


def test_recipe_readme_names_only_files_that_exist():
    readme = (REPO / "recipes" / "README.md").read_text(encoding="utf-8")
    import re

    named = set(re.findall(r"recipes/[\w./-]+\.yaml", readme))
    assert named, "recipes/README.md should give copy-paste commands"
    for name in named:
        assert (REPO / name).is_file(), f"recipes/README.md names {name}, which does not exist"
    for recipe in RECIPES + ACCELERATE:
        assert str(recipe.relative_to(REPO)) in named, f"{recipe.name} is not in recipes/README.md"


@pytest.mark.parametrize("config", ACCELERATE, ids=lambda p: p.name)
def test_accelerate_configs_load(config):
    from accelerate.commands.config.config_args import load_config_from_file

    loaded = load_config_from_file(str(config))
    expected = {"ddp.yaml": "MULTI_GPU", "fsdp.yaml": "FSDP", "zero3.yaml": "DEEPSPEED",
                "multinode-ddp.yaml": "MULTI_GPU", "multinode-fsdp.yaml": "FSDP"}[config.name]
    assert str(loaded.distributed_type).endswith(expected)


@pytest.mark.parametrize("command", ["init", "pretrain", "sft"])
def test_help(command):
    result = CliRunner().invoke(main, [command, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage:" in result.output


def test_cli_user_error_is_one_line(tmp_path):
    path = _write(tmp_path, "model_name_or_path: m\nnot_a_key: 1\n")
    result = CliRunner().invoke(main, ["sft", "--recipe", str(path)])
    assert result.exit_code == 2
    assert result.output.strip() == f"error: unknown key in recipe '{path}': not_a_key"
    result = CliRunner().invoke(main, ["pretrain", "--recipe", str(tmp_path / "missing.yaml")])
    assert result.exit_code == 2 and "Traceback" not in result.output


def test_cli_resume_without_checkpoints_fails_cleanly(tmp_path):
    out = tmp_path / "run"
    result = CliRunner().invoke(main, ["sft", "--model_name_or_path", "m", "--dataset_name", "d",
                                       "--output_dir", str(out), "--resume"])
    assert result.exit_code == 2
    assert "nothing to resume" in result.output
    assert not out.exists()


def test_gpu_recipes_compute_in_bf16_and_cpu_recipes_in_fp32():
    for recipe in RECIPES:
        data = yaml.safe_load(recipe.read_text(encoding="utf-8"))
        if data.get("use_cpu"):
            assert not data.get("bf16") and data.get("dtype", "float32") == "float32", recipe.name
        else:
            assert data.get("bf16") is True, recipe.name
            # LoRA trains fp32 adapters on a frozen base, which may load in bf16; full fine-tuning keeps fp32
            # weights, whose small updates bf16 would round away
            expected = "bfloat16" if data.get("use_peft") else "float32"
            assert data.get("dtype", "float32") == expected, recipe.name


@pytest.mark.parametrize("old, new", RENAMED_KEYS)
@pytest.mark.parametrize("spelling", ["old", "new"])
def test_renamed_keys_work_in_either_spelling(tmp_path, old, new, spelling):
    """transformers 5.23 renamed gradient_checkpointing to activation_checkpointing: a recipe written for
    either side of the rename parses at every supported version."""
    key = old if spelling == "old" else new
    installed = _installed_names(_parser())[key]
    value = {"use_reentrant": False} if key.endswith("kwargs") else False  # TRL's own default is on
    assert getattr(recipe_from_dict({key: value}).training, installed) == value
    assert getattr(parse_recipe([], "sft", _write(tmp_path, yaml.safe_dump({key: value}))).training, installed) == value


@pytest.mark.parametrize("flag", ["--gradient_checkpointing", "--activation_checkpointing", "--activation-checkpointing"])
def test_renamed_flags_work_in_either_spelling(flag):
    assert parse_recipe([flag, "false"], "sft").training.gradient_checkpointing is False
    assert parse_recipe([f"{flag}=false"], "sft").training.gradient_checkpointing is False


def test_both_spellings_of_a_renamed_key_must_agree():
    # a run's recipe.yaml written under transformers >= 5.23 holds both names with one value
    assert recipe_from_dict({"gradient_checkpointing": False, "activation_checkpointing": False}
                            ).training.gradient_checkpointing is False
    with pytest.raises(LNSError, match="gradient_checkpointing and activation_checkpointing are one setting "
                                       r"\(transformers renamed it\) but have different values"):
        recipe_from_dict({"gradient_checkpointing": True, "activation_checkpointing": False})


INF, NAN = float("inf"), float("nan")


@pytest.mark.parametrize("key, value, wanted", [
    ("learning_rate", INF, "a finite number"),
    ("learning_rate", NAN, "a finite number"),
    ("learning_rate", -1e-4, "> 0"),
    ("learning_rate", 0, "> 0"),
    ("weight_decay", -0.1, ">= 0"),
    ("weight_decay", NAN, "a finite number"),
    ("warmup_steps", INF, "a finite number"),
    ("max_grad_norm", -1.0, r">= 0 \(0: no clipping\)"),
    ("max_grad_norm", INF, "a finite number"),
    ("adam_beta1", 1.0, r"in \[0, 1\)"),
    ("adam_beta2", -0.5, r"in \[0, 1\)"),
    ("adam_epsilon", 0.0, "> 0"),
    ("adam_epsilon", NAN, "a finite number"),
    ("lora_r", 0, ">= 1"),
    ("lora_alpha", 0, "> 0"),
    ("lora_dropout", 1.0, r"in \[0, 1\)"),
    ("max_steps", -5, r"-1 \(train by epochs\) or > 0"),
    ("max_steps", 0, r"-1 \(train by epochs\) or > 0"),
    ("num_train_epochs", 0, "> 0"),
    ("num_train_epochs", INF, "a finite number"),
    ("per_device_train_batch_size", 0, ">= 1"),
    ("per_device_eval_batch_size", 0, ">= 1"),
    ("gradient_accumulation_steps", 0, ">= 1"),
    ("eval_fraction", NAN, "a finite number"),
    ("eval_fraction", 1.0, r"in \[0, 1\)"),
    ("distill_weight", INF, "a finite number"),
    ("distill_weight", 1.5, r"in \[0, 1\]"),
    ("distill_temperature", INF, "a finite number"),
    ("distill_temperature", 0.0, "> 0"),
    ("distill_chunk_size", 0, ">= 1"),
    ("lns_ramp_steps", -1, ">= 0"),
])
def test_out_of_range_values_are_refused_when_parsed(tmp_path, key, value, wanted):
    message = f"^recipe key '{key}' must be {wanted}, got "
    with pytest.raises(LNSError, match=message):
        recipe_from_dict({key: value})
    recipe = _write(tmp_path, yaml.safe_dump({key: value}))  # YAML's .inf / .nan
    with pytest.raises(LNSError, match=message):
        parse_recipe([], "sft", recipe)


@pytest.mark.parametrize("key, value", [("learning_rate", 1e-12), ("max_steps", -1), ("max_steps", 1),
                                        ("max_grad_norm", 0.0), ("adam_beta2", 0.0), ("lora_dropout", 0.0),
                                        ("distill_weight", 1.0), ("warmup_steps", 0.5)])
def test_edge_values_that_train_are_accepted(key, value):
    recipe = recipe_from_dict({key: value})
    assert getattr(next(p for p in recipe.as_tuple() if hasattr(p, key)), key) == value


def test_cli_refuses_a_non_finite_learning_rate_in_one_line(tmp_path):
    path = _write(tmp_path, "model_name_or_path: m\ndataset_name: d.jsonl\nlearning_rate: .inf\n"
                            f"output_dir: {tmp_path / 'out'}\n")
    result = CliRunner().invoke(main, ["sft", "--recipe", str(path)])
    assert result.exit_code == 2
    assert result.output.strip() == "error: recipe key 'learning_rate' must be a finite number, got inf"
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.incomplete").exists()
