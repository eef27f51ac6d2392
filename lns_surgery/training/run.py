"""The training loop shared by ``pretrain`` and ``sft``: TRL's SFTTrainer with LNS-aware model loading,
the ramp, PEFT, and outputs that only appear once training has finished.

While it runs, everything (checkpoints, TensorBoard logs) lives in ``<output_dir>.incomplete``; at the
end the final model, adapter, ``metrics.json`` and ``recipe.yaml`` are written there and the folder is
renamed to ``output_dir``. ``resume`` continues from that folder's last checkpoint.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lns_surgery.core.errors import LNSError
from lns_surgery.core.lns_status import lns_status
from lns_surgery.training.recipe import Recipe, recipe_from_dict  # noqa: F401 (re-exported)

logger = logging.getLogger(__name__)

INCOMPLETE_SUFFIX = ".incomplete"


@dataclass
class TrainResult:
    """What a run produced. ``model`` is the final standalone model (merged when LoRA was used)."""

    model: Any
    tokenizer: Any
    metrics: dict
    output_dir: Path
    trainer: Any = None


def incomplete_dir(output_dir: str | os.PathLike) -> Path:
    output_dir = Path(output_dir)
    return output_dir.with_name(output_dir.name + INCOMPLETE_SUFFIX)


def _last_checkpoint(folder: Path) -> str | None:
    from transformers.trainer_utils import get_last_checkpoint

    return get_last_checkpoint(str(folder)) if folder.is_dir() else None


def _on_main_process(state, action) -> None:
    """Run ``action`` on the main process alone; if it refuses, every process raises its error, so that
    none is left waiting for the others."""
    error = None
    if state.is_main_process:
        try:
            action()
        except LNSError as exc:
            error = str(exc)
    if state.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        shared = [error]
        broadcast_object_list(shared)
        error = shared[0]
    if error is not None:
        raise LNSError(error)


def _plan_output(args, training, state, model_config=None) -> tuple[Path, Path, str | None]:
    """(final dir, working dir, checkpoint to resume from), refusing to clobber anything by accident."""
    from lns_surgery.core import outputs

    if not training.output_dir:
        raise LNSError("the recipe needs output_dir")
    final = Path(training.output_dir)
    work = incomplete_dir(final)
    resume_from = None
    # The run reads these; its output folders may not touch them (lns_surgery.core.outputs has the rule).
    inputs = [getattr(model_config, "model_name_or_path", None), args.dataset_name, args.tokenizer_name_or_path,
              args.chat_template]

    def claim():  # one run per output_dir at a time, until train() ends: a second refuses now
        outputs.check_output(final, args.overwrite, inputs, flag="output_dir")
        outputs.check_inputs(work, inputs, flag="output_dir")
        outputs.lock_output(final, flag="output_dir")

    _on_main_process(state, claim)  # the other processes would find the main one's lock, and wait on it
    if args.resume:
        resume_from = _last_checkpoint(work)
        if resume_from is None:
            raise LNSError(f"nothing to resume: no checkpoint in '{work}' (set save_steps so that runs leave checkpoints)")
    elif training.resume_from_checkpoint:
        resume_from = training.resume_from_checkpoint
    elif work.exists() and any(path.name != outputs.MARKER_NAME for path in work.iterdir()):
        if not args.overwrite:
            raise LNSError(f"an interrupted run left '{work}'; pass --resume to continue it or --overwrite to start over")
        if state.is_main_process:
            outputs.remove_output(work)
    if state.is_main_process:  # label the working folder as this tool's, so --overwrite may replace it
        work.mkdir(parents=True, exist_ok=True)
        outputs.mark_output(work, working=True)
    state.wait_for_everyone()
    return final, work, resume_from


def _peft_config(args, model_config, model):
    from trl import get_peft_config

    from lns_surgery.training.models import norm_module_names

    peft_config = get_peft_config(model_config)
    if peft_config is None:
        if args.train_norms:
            logger.info("train_norms: full fine-tuning already trains the norm weights")
        return None
    if getattr(peft_config, "task_type", None) is None:
        # A recipe's lora_task_type: null would write an adapter that AutoPeftModelForCausalLM refuses for
        # any custom-code (LNS) base: without a task type it imports the base class by module name.
        peft_config.task_type = "CAUSAL_LM"
    if args.train_norms:
        names = norm_module_names(model)
        peft_config.modules_to_save = sorted(set(peft_config.modules_to_save or []) | set(names))
    if getattr(peft_config, "lora_dropout", 0) and _adapts_expert_parameters(peft_config, model):
        # PEFT raises a bare ValueError from deep inside the trainer's set-up for this (its ParamWrapper
        # cannot put dropout before a fused expert matmul); TRL's default lora_dropout is 0.05.
        raise LNSError("LoRA on this model's fused mixture-of-experts parameters cannot use dropout: "
                       "set lora_dropout: 0")
    return peft_config


def _adapts_expert_parameters(peft_config, model) -> bool:
    """Whether PEFT will adapt parameters rather than modules: transformers 5 fuses each block's experts
    into parameters, which PEFT targets (for "all-linear" too) on the model types it maps. Decided by
    PEFT's own conversion, on a copy of the config."""
    import copy

    try:
        from peft.utils.transformers_weight_conversion import convert_peft_config_for_transformers
    except ImportError:  # transformers 4 or an older PEFT: no fused experts to resolve
        return bool(getattr(peft_config, "target_parameters", None))
    probe = copy.deepcopy(peft_config)
    try:
        convert_peft_config_for_transformers(probe, model=model, conversions=None)
    except ValueError:  # a target list PEFT cannot convert: it says why itself
        return False
    return bool(getattr(probe, "target_parameters", None))


def _make_trainer_class(distill: bool = False):
    from trl import SFTTrainer

    from lns_surgery.training.callbacks import current_alpha

    class LNSTrainer(SFTTrainer):
        """SFTTrainer that also logs the LNS strength, so a ramp shows in the logs and metrics.json."""

        def log(self, logs, start_time=None):
            alpha = current_alpha(self.model)
            if alpha is not None and not any(key.startswith("eval_") for key in logs):
                logs["lns_alpha"] = alpha
            super().log(logs, start_time)

    if distill:  # heals by distillation from the source model: constructed with distillation= and teacher=
        from lns_surgery.training.distill import distillation_trainer_class

        return distillation_trainer_class(LNSTrainer)
    return LNSTrainer


def build_trainer(recipe: Recipe, callbacks=None):
    """Load model, tokenizer and data for ``recipe`` and return ``(trainer, info)``; nothing is trained
    or written. ``info`` has the detected ``dataset_format``, ``added_token_ids`` and ``lora``."""
    from lns_surgery.training import data, models
    from lns_surgery.training.callbacks import LNSRampCallback, use_compact_logs
    from lns_surgery.training.distributed import check_launch, check_sharding

    args, training, model_config = recipe.as_tuple()
    check_launch(training)
    tokenizer = models.load_tokenizer(args, model_config)
    train_data, eval_data = data.load_datasets(args, seed=training.seed)
    train_data, data_format = data.prepare_dataset(train_data, args.dataset_format, training.dataset_text_field)
    if eval_data is not None:
        eval_data, _ = data.prepare_dataset(eval_data, data_format, training.dataset_text_field)
    if training.assistant_only_loss and data_format != "messages":
        raise LNSError(f"assistant_only_loss needs chat (messages) data; this dataset is {data_format}")
    if training.completion_only_loss and data_format not in ("alpaca", "prompt_completion"):
        raise LNSError(f"completion_only_loss needs prompt/completion data; this dataset is {data_format}")
    if args.dataset_streaming and training.max_steps <= 0:
        raise LNSError("a streamed dataset has no length: set max_steps")

    model = models.load_model(args, training, model_config, tokenizer=tokenizer)
    if training.use_liger_kernel and lns_status(model.config).kind == "lns":
        # Liger patches by config.model_type: lns_* gets nothing (the run would not be what the recipe
        # says), and a model converted on load still answers its stock type there, so Liger would swap
        # its scaled norms for kernels that read the unscaled weight. Hub kernels skip the scaled norms
        # (lns_layers._NotKernelized) and kernelize the rest.
        raise LNSError("use_liger_kernel: Liger chooses kernels by model type and would skip this LNS model or "
                       "replace its scaled norms; use model_init_kwargs: {use_kernels: true} instead")
    added = data.prepare_tokenizer(tokenizer, model, data_format, args.chat_template)
    peft_config = _peft_config(args, model_config, model)
    from lns_surgery.training.performance import ThroughputCallback

    extra = [*(callbacks or []), ThroughputCallback(lora=peft_config is not None)]
    if args.lns_ramp_steps:
        extra.insert(0, LNSRampCallback(args.lns_ramp_steps))
    if eval_data is None and training.eval_strategy != "no":
        raise LNSError(f"eval_strategy is '{training.eval_strategy.value}' but there is no evaluation data: "
                       "set dataset_test_split or eval_fraction")
    if args.heal_norms == "freeze" and peft_config is None:
        models.freeze_scaled_norms(model)
    distillation = {}
    if args.distill:
        from lns_surgery.training.distill import DistillationSettings, SourceTeacher

        # LoRA: the student itself with the adapter disabled. Full fine-tuning: the source checkpoint loaded
        # as its own model, which the trainer shards or places like the student.
        teacher = SourceTeacher() if peft_config is not None else SourceTeacher.load(args, training, model_config,
                                                                                     tokenizer, model)
        distillation = {"distillation": DistillationSettings.from_recipe(args), "teacher": teacher}
    trainer = _make_trainer_class(args.distill)(
        model=model,
        args=training,
        train_dataset=train_data,
        eval_dataset=eval_data,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=extra,
        **distillation,
    )
    check_sharding(trainer)  # an FSDP/DeepSpeed request that accelerate turned into DDP stops here
    use_compact_logs(trainer)
    return trainer, {"dataset_format": data_format, "added_token_ids": added, "lora": peft_config is not None}


def _is_sharded_or_quantized(trainer) -> bool:
    model = trainer.model
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if getattr(base, "is_loaded_in_4bit", False) or getattr(base, "is_loaded_in_8bit", False):
        return True
    if trainer.is_fsdp_enabled:
        return True
    plugin = getattr(trainer.accelerator.state, "deepspeed_plugin", None)
    return plugin is not None and getattr(plugin, "zero_stage", 0) == 3


def _merged_model(trainer, recipe: Recipe, adapter_dir: Path):
    """The LoRA-trained model as one standalone model: merged in memory when its weights are whole here,
    else (FSDP, ZeRO-3, 4/8-bit bases) rebuilt on this process from the base and the saved adapter."""
    if not _is_sharded_or_quantized(trainer):
        return trainer.model.merge_and_unload()
    import dataclasses as dc

    from peft import PeftModel

    from lns_surgery.training import models
    from lns_surgery.training.distributed import outside_zero3_init

    args, training, model_config = recipe.as_tuple()
    model_config = dc.replace(model_config, load_in_4bit=False, load_in_8bit=False, dtype="auto")
    with outside_zero3_init():  # only the main process rebuilds: a partitioned load would wait for the others
        base = models.load_model(args, training, model_config, tokenizer=trainer.processing_class)
        if base.get_input_embeddings().weight.shape[0] != len(trainer.processing_class):
            base.resize_token_embeddings(len(trainer.processing_class))
        if args.lns_ramp_steps:
            from lns_surgery.training.callbacks import current_alpha

            base.set_lns_alpha(current_alpha(trainer.model))
        return PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()


def _plain(value):
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


# run-specific switches, and a key the parser reads as a boolean although the run stores a mode in it
_NOT_RECIPE_KEYS = ("resume", "overwrite", "resume_from_checkpoint", "include_num_input_tokens_seen")


def _default(field, command_defaults: dict):
    if field.name in command_defaults:
        return command_defaults[field.name]
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return None


def recipe_settings(recipe: Recipe, output_dir: Path) -> dict:
    """The recipe keys of this run that differ from the command's defaults: a recipe that reproduces it.

    Defaults come from the dataclass fields, not from building new ``SFTConfig`` objects: that would
    set up devices (and, under a launcher, talk to the other processes) on the main process alone.
    """
    from lns_surgery.training.recipe import command_defaults

    defaults = command_defaults(recipe.command)
    settings = {}
    for part in recipe.as_tuple():
        for field in dataclasses.fields(part):
            if not field.init or field.name in _NOT_RECIPE_KEYS:
                continue
            value = _plain(getattr(part, field.name))
            plain_type = isinstance(value, (str, int, float, bool, list, dict, type(None)))
            if plain_type and value != _plain(_default(field, defaults)):
                settings[field.name] = value
    settings["output_dir"] = str(output_dir)
    for derived in ("logging_dir", "hub_token", "deepspeed_plugin", "distributed_state"):
        settings.pop(derived, None)
    return settings


def _give_adapter_an_lns_base(trainer, adapter_dir: Path, work: Path, final: Path) -> None:
    """Point the adapter at an LNS base when the model was converted on load (``lns_convert``).

    PEFT records the checkpoint the model was loaded from as the adapter's base; for a stock checkpoint
    converted in memory, ``AutoPeftModelForCausalLM`` would load that stock model and silently compute
    without LNS. The run therefore writes the code-mode conversion of that checkpoint (its weights
    copied, at the alpha training ended with) to ``<output_dir>/base`` and names it as the base.
    """
    import json

    from lns_surgery import convert
    from lns_surgery.core.checkpoint import read_config, resolve_source, write_json
    from lns_surgery.training.callbacks import current_alpha

    config_path = adapter_dir / "adapter_config.json"
    adapter_config = json.loads(config_path.read_text(encoding="utf-8"))
    base = adapter_config.get("base_model_name_or_path")
    alpha = current_alpha(trainer.model)
    if not base or alpha is None:
        return
    folder, _ = resolve_source(base)  # a Hub base is in the local cache: the run loaded it
    if lns_status(read_config(folder)).kind == "lns":
        return  # trained on an LNS checkpoint: the base already is one
    convert(folder, work / "base", alpha=alpha)
    adapter_config["base_model_name_or_path"] = str((final / "base").resolve())
    write_json(config_path, adapter_config)


class DivergedError(LNSError):
    """Training left weights that are inf or NaN: nothing is exported."""


def _refuse_non_finite_weights(trainer, work: Path, metrics: dict, state) -> None:
    """Stop before exporting a model with inf or NaN weights (a learning rate that blew up, say): it would
    load anywhere and compute nothing but NaN. Every process checks its own shard (FSDP's DTensor,
    ZeRO-3's partition) and all of them see the gathered result, so they stop together."""
    import torch
    from accelerate.utils import gather_object

    from lns_surgery.training.callbacks import write_metrics

    names = []
    for name, parameter in trainer.model.named_parameters():
        local = parameter.to_local() if hasattr(parameter, "to_local") else getattr(parameter, "ds_tensor", parameter)
        if local.numel() and not bool(torch.isfinite(local.detach()).all()):
            names.append(name)
    bad = sorted(set(gather_object(names)))
    if not bad:
        return
    total = sum(1 for _ in trainer.model.parameters())
    if state.is_main_process:
        write_metrics(work / "metrics.json", metrics)
    raise DivergedError(f"training diverged: {len(bad)} of {total} weight tensors hold inf or NaN (e.g. {bad[0]}); "
                        f"nothing was exported, and '{work}' is kept for inspection (try a lower learning_rate)")


@contextlib.contextmanager
def _whole_model_saves(trainer):
    """Within: the Trainer saves an FSDP2 model whole, as ``from_pretrained`` reads it.

    With ``fsdp_state_dict_type: SHARDED_STATE_DICT`` (the shipped FSDP configs) every checkpoint during
    training is written by each rank for its own shard, without gathering the model on one process; but
    transformers' ``save_model`` then writes no model at all, so the final one is saved as a full state
    dict, which accelerate gathers for FSDP2 whatever the plugin's type says.
    """
    plugin = getattr(trainer.accelerator.state, "fsdp_plugin", None)
    if not trainer.is_fsdp_enabled or plugin is None or getattr(plugin, "fsdp_version", 1) != 2 \
            or "FULL_STATE_DICT" in str(plugin.state_dict_type):
        yield
        return
    from torch.distributed.fsdp import StateDictType

    sharded = plugin.state_dict_type
    plugin.state_dict_type = StateDictType.FULL_STATE_DICT
    try:
        yield
    finally:
        plugin.state_dict_type = sharded


def _save_outputs(trainer, recipe: Recipe, work: Path, final: Path, info: dict, metrics: dict, state):
    """Write the final model (and adapter), metrics.json and recipe.yaml into ``work``, then rename it."""
    import yaml

    from lns_surgery.core import outputs
    from lns_surgery.training.callbacks import write_metrics

    args = recipe.args
    tokenizer = trainer.processing_class
    checkpoints = sorted(p for p in work.glob("checkpoint-*") if p.is_dir())
    model = None
    if info["lora"]:
        adapter_dir = work / "adapter"
        with _whole_model_saves(trainer):
            trainer.save_model(str(adapter_dir))  # every rank takes part (FSDP / ZeRO-3 gather the weights)
        if args.export in ("both", "adapter") and state.is_main_process:
            from lns_surgery.training.distributed import outside_zero3_init

            with outside_zero3_init():  # the main process alone converts the base: it must load whole
                _give_adapter_an_lns_base(trainer, adapter_dir, work, final)
        if args.export in ("both", "merged"):
            if state.is_main_process:
                model = _merged_model(trainer, recipe, adapter_dir)
                model.config.use_cache = True
                model.save_pretrained(str(work))
                tokenizer.save_pretrained(str(work))
                if args.export == "merged":
                    shutil.rmtree(adapter_dir)
            state.wait_for_everyone()
        else:
            model = trainer.model
    else:
        trainer.model.config.use_cache = True
        with _whole_model_saves(trainer):
            trainer.save_model(str(work))
        model = trainer.model
    if state.is_main_process:
        write_metrics(work / "metrics.json", metrics)
        (work / "recipe.yaml").write_text(
            f"# lns-surgery {recipe.command} --recipe recipe.yaml reproduces this run\n"
            + yaml.safe_dump(recipe_settings(recipe, final), sort_keys=False), encoding="utf-8")
        if checkpoints:
            (work / "checkpoints").mkdir(exist_ok=True)
            for checkpoint in checkpoints:
                os.replace(checkpoint, work / "checkpoints" / checkpoint.name)
        (work / "training_args.bin").unlink(missing_ok=True)
        # the manifest last, then the rename; an earlier output goes only if --overwrite may replace it
        outputs.replace_output(work, final, overwrite=args.overwrite, flag="output_dir")
    state.wait_for_everyone()
    return model


def train(recipe: Recipe | Any, training=None, model_config=None, *, command: str | None = None,
          callbacks=None) -> TrainResult:
    """Run a recipe: ``train(recipe)`` or ``train(recipe_args, sft_config, model_config)``.

    Returns the final model, its tokenizer, the metrics (as written to ``metrics.json``) and the output
    folder. Only the output folder's final contents are written at the end; checkpoints and logs go to
    ``<output_dir>.incomplete`` while training runs.
    """
    from accelerate import PartialState

    from lns_surgery.training.callbacks import final_metrics

    if not isinstance(recipe, Recipe):
        recipe = Recipe(recipe, training, model_config, command or "sft")
    elif command is not None:
        recipe.command = command
    args, training, model_config = recipe.as_tuple()
    state = PartialState()
    existed = incomplete_dir(training.output_dir).exists() if training.output_dir else True
    from lns_surgery.core import outputs

    try:
        final, work, resume_from = _plan_output(args, training, state, model_config)
    except BaseException:
        outputs.unlock_output(training.output_dir or None)
        raise
    training.output_dir = str(work)
    try:
        trainer, info = build_trainer(recipe, callbacks=callbacks)
        train_output = trainer.train(resume_from_checkpoint=resume_from)
        eval_metrics = _final_evaluation(trainer)
        metrics = final_metrics(trainer.state, train_output, eval_metrics)
        metrics["train"].update(_throughput(trainer))
        metrics["dataset_format"] = info["dataset_format"]
        _refuse_non_finite_weights(trainer, work, metrics, state)
        model = _save_outputs(trainer, recipe, work, final, info, metrics, state)
    except BaseException as exc:
        # A run that failed before its first checkpoint leaves nothing to resume: no empty working folder.
        # A diverged run keeps it: its metrics show where the loss went.
        if (not existed and not isinstance(exc, DivergedError) and state.is_main_process and work.is_dir()
                and not any(work.glob("checkpoint-*"))):
            outputs.remove_working_folder(work)  # never raises: the error on its way matters more
        raise
    finally:
        training.output_dir = str(final)
        outputs.unlock_output(final)
    return TrainResult(model=model, tokenizer=trainer.processing_class, metrics=metrics, output_dir=final,
                       trainer=trainer)


def _throughput(trainer) -> dict:
    """Steady-state tokens/s, MFU and peak memory, as the run's ThroughputCallback measured them."""
    from lns_surgery.training.performance import ThroughputCallback

    timers = [c for c in trainer.callback_handler.callbacks if isinstance(c, ThroughputCallback)]
    summary = timers[0].summary() if timers else {}
    summary["attn_implementation"] = getattr(trainer.model.config, "_attn_implementation", None)
    return summary


def _final_evaluation(trainer) -> dict | None:
    """The held-out metrics of the model as trained. transformers evaluates after the last step of a
    step- or epoch-based schedule by itself; that evaluation is reused, not run a second time (on CPU
    one pass over an SFT split takes minutes). A model swapped for the best checkpoint is evaluated again."""
    if trainer.eval_dataset is None:
        return None
    logged = [entry for entry in trainer.state.log_history if "eval_loss" in entry]
    if logged and logged[-1].get("step") == trainer.state.global_step and not trainer.args.load_best_model_at_end:
        return {key: value for key, value in logged[-1].items() if key != "step"}
    return trainer.evaluate()


def train_from_dict(settings: dict, command: str = "sft", callbacks=None) -> TrainResult:
    """``train`` with the recipe given as a dict of recipe keys (the same keys as the YAML files)."""
    return train(recipe_from_dict(settings, command), callbacks=callbacks)
