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

# Keys transformers renamed, as (old, new). transformers 5.23 renamed gradient checkpointing to activation
# checkpointing and kept the old names as deprecated aliases (to be removed in v6); 5.17-5.22 know only
# the old names. A recipe may use either spelling at every supported version: each is passed on under
# the name the installed TrainingArguments defines, the new one where it exists.
RENAMED_KEYS = (
    ("gradient_checkpointing", "activation_checkpointing"),
    ("gradient_checkpointing_kwargs", "activation_checkpointing_kwargs"),
)

# Values the libraries accept but that cannot train (a learning rate of -1 or NaN fails deep inside the
# optimizer, max_steps: -5 silently trains by epochs, lora_r: 0 fails in PEFT): refused when the recipe
# is parsed, before any work. Rows: key, whether a value is valid, what a valid value is. Every number in
# a recipe must also be finite. A key the installed libraries do not define is skipped.
VALUE_RANGES = (
    ("learning_rate", lambda v: v > 0, "> 0"),
    ("weight_decay", lambda v: v >= 0, ">= 0"),
    ("warmup_steps", lambda v: v >= 0, ">= 0 (a number of steps, or a fraction of them below 1)"),
    ("max_grad_norm", lambda v: v >= 0, ">= 0 (0: no clipping)"),
    ("adam_beta1", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("adam_beta2", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("adam_epsilon", lambda v: v > 0, "> 0"),
    ("lora_r", lambda v: v >= 1, ">= 1"),
    ("lora_alpha", lambda v: v > 0, "> 0"),
    ("lora_dropout", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("max_steps", lambda v: v == -1 or v > 0, "-1 (train by epochs) or > 0"),
    ("num_train_epochs", lambda v: v > 0, "> 0"),
    ("per_device_train_batch_size", lambda v: v >= 1, ">= 1"),
    ("per_device_eval_batch_size", lambda v: v >= 1, ">= 1"),
    ("gradient_accumulation_steps", lambda v: v >= 1, ">= 1"),
    ("eval_fraction", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("lns_ramp_steps", lambda v: v >= 0, ">= 0"),
    ("distill_weight", lambda v: 0 <= v <= 1, "in [0, 1]"),
    ("distill_temperature", lambda v: v > 0, "> 0"),
    ("distill_chunk_size", lambda v: v >= 1, ">= 1"),
)


def check_values(part) -> None:
    """Refuse a non-finite number, or a value outside ``VALUE_RANGES``, in one parsed recipe part."""
    import dataclasses
    import math

    ranges = {key: (valid, wanted) for key, valid, wanted in VALUE_RANGES}
    for field_ in dataclasses.fields(part):
        value = getattr(part, field_.name, None)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue  # other types are _check_value_types' business
        if not math.isfinite(value):
            raise LNSError(f"recipe key '{field_.name}' must be a finite number, got {value}")
        if field_.name in ranges and not ranges[field_.name][0](value):
            raise LNSError(f"recipe key '{field_.name}' must be {ranges[field_.name][1]}, got {value}")


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
    distill_chunk_size: int = field(
        default=1024,
        metadata={"help": "Tokens per chunk of the distillation loss: its memory grows with the chunk "
                          "(chunk x vocabulary logits of student and teacher), not with the batch."},
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
        check_values(self)
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

    from lns_surgery.core.yaml import safe_load

    path = Path(path)
    if not path.is_file():
        raise LNSError(f"recipe '{path}' not found")
    try:
        data = safe_load(path.read_text(encoding="utf-8"))  # a key written twice is refused, not overwritten
    except yaml.YAMLError as exc:
        raise LNSError(f"recipe '{path}' is not valid YAML: {first_line(exc)}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise LNSError(f"recipe '{path}' must be a YAML mapping of keys to values, not a {type(data).__name__}")
    return data


def _known_keys(parser) -> set[str]:
    return {action.dest for action in parser._actions}


def _unknown_keys(parser, keys) -> list[str]:
    known = _known_keys(parser) | {"env"}
    names = _installed_names(parser)
    return [key for key in keys if names.get(key, key) not in known]


def _installed_names(parser) -> dict[str, str]:
    """Both spellings of each renamed key -> the one this parser (the installed TrainingArguments) knows."""
    known = _known_keys(parser)
    names = {}
    for old, new in RENAMED_KEYS:
        installed = new if new in known else old
        names[old] = names[new] = installed
    return names


def _rename_keys(parser, settings: dict, where: str) -> dict:
    """``settings`` with each renamed key under its installed name. Both spellings may appear (a run's
    ``recipe.yaml`` written by transformers >= 5.23 holds both) but must then agree."""
    names = _installed_names(parser)
    renamed: dict[str, Any] = {}
    given: dict[str, str] = {}
    for key, value in settings.items():
        name = names.get(key, key)
        if name in renamed and renamed[name] != value:
            raise LNSError(f"{where}: {given[name]} and {key} are one setting (transformers renamed it) "
                           "but have different values; give one")
        renamed[name], given[name] = value, key
    return renamed


def _rename_flags(parser, argv: list[str]) -> list[str]:
    names = _installed_names(parser)
    renamed = []
    for token in argv:
        if token.startswith("--"):
            name, sep, value = token[2:].partition("=")
            key = name.replace("-", "_")
            if key in names:
                token = f"--{names[key]}{sep}{value}"
        renamed.append(token)
    return renamed


def _set_recipe(parser, settings: dict) -> None:
    """Make ``settings`` the parser's defaults (command-line flags still win), after exporting its ``env``."""
    settings = dict(settings)
    env = settings.pop("env", None) or {}
    if not isinstance(env, dict):
        raise LNSError(f"recipe key 'env' must be a mapping of variable names to values, not a {type(env).__name__}")
    for key, value in env.items():
        os.environ[key] = str(value)
    parser.set_defaults_with_config(**settings)


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
        check_values(part)
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
    parser = _parser()
    parser.set_defaults_with_config(**command_defaults(command))
    argv = _rename_flags(parser, list(argv or []))
    if recipe is not None:
        data = _read_yaml(recipe)
        unknown = _unknown_keys(parser, data)
        if unknown:
            raise LNSError(f"unknown key{'s' if len(unknown) > 1 else ''} in recipe '{recipe}': {', '.join(unknown)}")
        data = _rename_keys(parser, data, f"recipe '{recipe}'")
    for token in argv:  # name unknown flags ourselves: HfArgumentParser's message lists every remaining token
        if token.startswith("--") and token != "--config":
            name = token[2:].split("=", 1)[0]
            if _unknown_keys(parser, [name]) and _unknown_keys(parser, [name.replace("-", "_")]):
                raise LNSError(f"unknown option --{name}")
    if recipe is not None:
        _set_recipe(parser, data)
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
    _set_recipe(parser, _rename_keys(parser, settings, "the settings"))
    return _finish(parser, command, lambda: parser.parse_args_into_dataclasses(args=[]))
