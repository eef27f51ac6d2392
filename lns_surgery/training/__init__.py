"""Training: continued pre-training (healing), SFT recipes and from-scratch models, on TRL and PEFT.

    from lns_surgery.training import train_from_dict
    result = train_from_dict({"model_name_or_path": "Qwen/Qwen2.5-0.5B", "lns_convert": True,
                              "dataset_name": "tatsu-lab/alpaca", "output_dir": "out"}, command="sft")
    result.model, result.tokenizer, result.metrics, result.output_dir

The API is imported lazily, so importing this package does not import torch, transformers or TRL.
"""

from __future__ import annotations

from lns_surgery._lazy import lazy_exports

_API = {
    "train": "lns_surgery.training.run",
    "train_from_dict": "lns_surgery.training.run",
    "build_trainer": "lns_surgery.training.run",
    "TrainResult": "lns_surgery.training.run",
    "Recipe": "lns_surgery.training.recipe",
    "RecipeArguments": "lns_surgery.training.recipe",
    "parse_recipe": "lns_surgery.training.recipe",
    "recipe_from_dict": "lns_surgery.training.recipe",
    "init_model": "lns_surgery.training.models",
    "PRESETS": "lns_surgery.training.models",
    "LNSRampCallback": "lns_surgery.training.callbacks",
}

__all__ = sorted(_API)


__getattr__, __dir__ = lazy_exports(__name__, _API, globals())
