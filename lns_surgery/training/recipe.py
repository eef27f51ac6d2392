"""Training recipes: one flat YAML (or a dict) parsed by TRL's ``TrlParser`` into three dataclasses.

``RecipeArguments`` holds this project's keys (data, LNS surgery, export); TRL's ``SFTConfig`` holds
every ``TrainingArguments``/SFT key and ``ModelConfig`` the model and LoRA keys, under the names a TRL
user already knows (``model_name_or_path``, ``dataset_name``, ``max_length``, ``use_peft``, ``lora_r``,
...). Command-line flags override the YAML; an unknown key fails with its name.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lns_surgery.core.errors import LNSError, first_line

COMMANDS = ("pretrain", "sft")
FORMATS = ("auto", "text", "alpaca", "messages", "prompt_completion")
EXPORTS = ("both", "merged", "adapter")
HEAL_NORMS = ("train", "freeze")


@dataclass
class RecipeArguments:
    """This project's recipe keys. Dataset keys keep the names of TRL's ``ScriptArguments``."""

    dataset_name: str | None = field(
        default=None,
        metadata={"help": "Hub dataset id, or a local .json/.jsonl/.txt/.parquet file or a folder of them."},
    )
    dataset_config: str | None = field(default=None, metadata={"help": "Dataset configuration (subset) name."})
    dataset_train_split: str = field(default="train", metadata={"help": "Split to train on."})
    dataset_test_split: str | None = field(
        default=None, metadata={"help": "Split to evaluate on (None: use eval_fraction, or no evaluation)."}
    )
    dataset_streaming: bool = field(
        default=False, metadata={"help": "Stream the dataset (large Hub corpora); needs max_steps."}
    )
    dataset_format: str = field(
        default="auto",
        metadata={"help": "text | alpaca | messages | prompt_completion | auto (detected from the columns).",
                  "choices": list(FORMATS)},
    )
    eval_fraction: float = field(
        default=0.0, metadata={"help": "Hold out this fraction of the training data for evaluation (no test split)."}
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Use at most this many training records."})
    max_eval_samples: int | None = field(
        default=None,
        metadata={"help": "Use at most this many evaluation records; a stream without a test split holds out "
                          "this many records from its start."},
    )
    tokenizer_name_or_path: str | None = field(
        default=None, metadata={"help": "Tokenizer to use (default: the model's own)."}
    )
    chat_template: str | None = field(
        default=None,
        metadata={"help": "'chatml', a .jinja file, or a template string; default: the tokenizer's own, else ChatML."},
    )
    lns_convert: bool = field(
        default=False, metadata={"help": "Apply LayerNorm Scaling to a stock model on load (no separate convert)."}
    )
    lns_ramp_steps: int = field(
        default=0,
        metadata={"help": "Move every scale linearly from 1 to 1/sqrt(l) over the first N optimizer steps (0: off)."},
    )
    init_preset: str | None = field(
        default=None,
        metadata={"help": "Train a from-scratch model of this preset (llama-130m, llama-250m, llama-350m, llama-1b) "
                          "instead of loading model_name_or_path; needs tokenizer_name_or_path."},
    )
    init_lns: bool = field(default=True, metadata={"help": "With init_preset: LNS (true) or the Pre-LN baseline."})
    train_norms: bool = field(
        default=False, metadata={"help": "With LoRA, also train the norm weights (full copies saved with the adapter)."}
    )
    distill: bool = field(
        default=False,
        metadata={"help": "Heal by distillation from the source model (the checkpoint before the surgery): "
                          "KL(source || model) per token, mixed with the LM loss by distill_weight."},
    )
    distill_temperature: float = field(default=1.0, metadata={"help": "Softmax temperature of the distillation loss."})
    distill_weight: float = field(
        default=1.0, metadata={"help": "loss = distill_weight * KL + (1 - distill_weight) * LM, in [0, 1]."}
    )
    heal_norms: str = field(
        default="train",
        metadata={"help": "train | freeze: whether full fine-tuning trains the norms LNS scales. Trained norms can "
                          "learn w -> sqrt(l) * w and undo the scaling; frozen ones keep it (analyze reports "
                          "the effective scales). With LoRA the norms train only with train_norms.",
                  "choices": list(HEAL_NORMS)},
    )
    export: str = field(
        default="both",
        metadata={"help": "With LoRA: both (adapter/ and a merged standalone model), merged, or adapter.",
                  "choices": list(EXPORTS)},
    )
    overwrite: bool = field(default=False, metadata={"help": "Replace output_dir (and leftover checkpoints) if lns-surgery wrote it."})
    resume: bool = field(default=False, metadata={"help": "Continue from the last checkpoint of an interrupted run."})

    def __post_init__(self):
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ValueError(f"eval_fraction must be in [0, 1), got {self.eval_fraction}")
        if self.lns_ramp_steps < 0:
            raise ValueError(f"lns_ramp_steps must be >= 0, got {self.lns_ramp_steps}")
        if not 0.0 <= self.distill_weight <= 1.0:
            raise ValueError(f"distill_weight must be in [0, 1], got {self.distill_weight}")
        if not self.distill_temperature > 0.0:
            raise ValueError(f"distill_temperature must be > 0, got {self.distill_temperature}")
        # argparse checks "choices" on the command line only; a YAML value arrives as a default.
        if self.export not in EXPORTS:
            raise ValueError(f"export must be one of {', '.join(EXPORTS)}, got {self.export!r}")
        if self.dataset_format not in FORMATS:
            raise ValueError(f"dataset_format must be one of {', '.join(FORMATS)}, got {self.dataset_format!r}")
        if self.heal_norms not in HEAL_NORMS:
            raise ValueError(f"heal_norms must be one of {', '.join(HEAL_NORMS)}, got {self.heal_norms!r}")
        if self.heal_norms == "freeze" and self.train_norms:
            raise ValueError("heal_norms: freeze and train_norms: true contradict each other")


@dataclass
class Recipe:
    """The three parsed parts of a recipe, plus the command it is for."""

    args: RecipeArguments
    training: Any  # trl.SFTConfig
    model: Any  # trl.ModelConfig
    command: str = "sft"

    def as_tuple(self):
        return self.args, self.training, self.model


def command_defaults(command: str) -> dict:
    """Defaults that differ between the commands and from TRL's, applied before the recipe's own keys."""
    import torch

    bf16 = bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    defaults: dict[str, Any] = {
        "bf16": bf16,  # TRL turns bf16 on by default, which fails on CPU
        "lora_target_modules": ["all-linear"],
        "report_to": "tensorboard" if _tensorboard_installed() else "none",
        "save_strategy": "no",
        "logging_steps": 10,
    }
    if command == "pretrain":
        # "wrapped" concatenates documents and cuts fixed windows, as pre-training does; TRL's
        # default (bfd) truncates each document to max_length and drops the rest of long ones.
        defaults.update({"dataset_format": "text", "packing": True, "packing_strategy": "wrapped", "use_peft": False})
    elif command == "sft":
        defaults.update({"use_peft": True})
    else:
        raise ValueError(f"unknown command {command!r}; expected one of {', '.join(COMMANDS)}")
    return defaults


def _tensorboard_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("tensorboard") is not None or importlib.util.find_spec("tensorboardX") is not None


def _parser():
    from trl import ModelConfig, SFTConfig, TrlParser

    class RecipeParser(TrlParser):
        # argparse exits the process on a bad flag; the Python API must raise instead.
        def error(self, message):
            raise LNSError(message)

    return RecipeParser((RecipeArguments, SFTConfig, ModelConfig))


def _read_yaml(path: str | os.PathLike) -> dict:
    import yaml

    path = Path(path)
    if not path.is_file():
        raise LNSError(f"recipe '{path}' not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise LNSError(f"recipe '{path}' is not valid YAML: {first_line(exc)}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise LNSError(f"recipe '{path}' must be a YAML mapping of keys to values, not a {type(data).__name__}")
    return data


def _unknown_keys(parser, keys) -> list[str]:
    known = {action.dest for action in parser._actions} | {"env"}
    return [key for key in keys if key not in known]


def _finish(parser, command: str, parse) -> Recipe:
    import warnings

    try:
        with warnings.catch_warnings():
            # TRL's own default (gradient_checkpointing=True) triggers transformers' rename warning on every parse
            warnings.filterwarnings("ignore", message=".*gradient_checkpointing.*deprecated", category=FutureWarning)
            args, training, model = parse()
    except LNSError:
        raise
    except (ValueError, TypeError) as exc:
        raise LNSError(f"invalid recipe: {first_line(exc)}") from None
    for part in (args, training, model):
        _check_value_types(part)
    if command == "pretrain" and args.dataset_format == "auto":
        args.dataset_format = "text"
    if training.include_num_input_tokens_seen == "no":  # tokens seen and tokens/s belong in every run's metrics
        training.include_num_input_tokens_seen = "non_padding"
    return Recipe(args, training, model, command)


# TrainingArguments turns these into another type while parsing (``fsdp: full_shard`` or ``true`` becomes
# True, its documented way of asking for FSDP), so their parsed values say nothing about the recipe's.
_REWRITTEN_WHILE_PARSING = {"fsdp"}


def _check_value_types(part) -> None:
    """Refuse recipe values of the wrong type: TrlParser passes YAML values through as they are, so a
    ``learning_rate: [1, 2]`` would otherwise fail deep inside the optimizer."""
    import dataclasses
    import types
    import typing

    try:
        hints = typing.get_type_hints(type(part))
    except Exception:  # an annotation this Python cannot evaluate: nothing to check it against
        return
    for field_ in dataclasses.fields(part):
        value, hint = getattr(part, field_.name), hints.get(field_.name)
        if value is None or hint is None or field_.name in _REWRITTEN_WHILE_PARSING:
            continue
        allowed = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
        simple = [kind for kind in allowed if kind in (bool, int, float, str)]
        if not simple or len(simple) != len([kind for kind in allowed if kind is not type(None)]):
            continue  # lists, dicts, enums, unions with other types: left to the libraries
        if float in simple and isinstance(value, int) and not isinstance(value, bool):
            continue
        if not isinstance(value, tuple(simple)) or (isinstance(value, bool) and bool not in simple):
            names = " or ".join({bool: "true/false", int: "an integer", float: "a number", str: "a string"}[k] for k in simple)
            raise LNSError(f"recipe key '{field_.name}' must be {names}, got {value!r}")


def parse_recipe(argv: list[str] | None = None, command: str = "sft", recipe: str | os.PathLike | None = None) -> Recipe:
    """Parse ``--flag value`` arguments (and the YAML ``recipe``; flags win) into a :class:`Recipe`."""
    argv = list(argv or [])
    parser = _parser()
    parser.set_defaults_with_config(**command_defaults(command))
    if recipe is not None:
        data = _read_yaml(recipe)
        unknown = _unknown_keys(parser, data)
        if unknown:
            raise LNSError(f"unknown key{'s' if len(unknown) > 1 else ''} in recipe '{recipe}': {', '.join(unknown)}")
        argv = ["--config", os.fspath(recipe), *argv]
    for token in argv:  # name unknown flags ourselves: HfArgumentParser's message lists every remaining token
        if token.startswith("--") and token != "--config":
            name = token[2:].split("=", 1)[0]
            if _unknown_keys(parser, [name]) and _unknown_keys(parser, [name.replace("-", "_")]):
                raise LNSError(f"unknown option --{name}")
    return _finish(parser, command, lambda: parser.parse_args_and_config(argv))


def recipe_from_dict(settings: dict, command: str = "sft") -> Recipe:
    """A :class:`Recipe` from a dict of recipe keys, as if they were a YAML file (no file needed)."""
    if not isinstance(settings, dict):
        raise LNSError(f"settings must be a dict of recipe keys, not a {type(settings).__name__}")
    parser = _parser()
    parser.set_defaults_with_config(**command_defaults(command))
    unknown = _unknown_keys(parser, settings)
    if unknown:
        raise LNSError(f"unknown recipe key{'s' if len(unknown) > 1 else ''}: {', '.join(unknown)}")
    settings = dict(settings)
    for key, value in settings.pop("env", {}).items():
        os.environ[key] = str(value)
    parser.set_defaults_with_config(**settings)
    return _finish(parser, command, lambda: parser.parse_args_into_dataclasses(args=[]))
