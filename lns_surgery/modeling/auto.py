"""The LNS classes inside this process, registered with transformers' Auto classes.

They are built from the same parts as the code written into checkpoints (``lns_layers.py`` and the
templates in it), so a checkpoint behaves the same whether it is loaded here without remote code or
anywhere else with ``trust_remote_code=True``.
"""

from __future__ import annotations

import functools

from lns_surgery.modeling.lns_layers import (
    LayerNormScalingMixin,
    lns_class_name,
    lns_model_type,
    share_peft_targets,
    share_weight_conversions,
)


def _is_transformers_class(name: str) -> bool:
    return "." not in name  # "modeling_foo.Foo" names a checkpoint's own custom code


@functools.cache
def _build_classes(base_model_type: str, base_classes: tuple) -> dict:
    import transformers

    classes = dict(base_classes)
    base_config = getattr(transformers, classes.pop("config"))
    config_class = type(
        lns_class_name(base_config.__name__),
        (base_config,),
        {"model_type": lns_model_type(base_model_type), "__module__": __name__},
    )
    share_weight_conversions(base_model_type, list(classes.values()))
    share_peft_targets(base_model_type)
    built = {"config": config_class}
    for auto_name, base_name in classes.items():
        base = getattr(transformers, base_name)
        built[auto_name] = type(
            lns_class_name(base_name),
            (LayerNormScalingMixin, base),
            {"config_class": config_class, "__module__": __name__},
        )
    return built


def lns_classes(lns: dict) -> dict | None:
    """``{"config": LNSConfig, "AutoModelForCausalLM": LNS...ForCausalLM, ...}`` for an ``lns`` block,
    or None when the base model is itself custom code (then only ``trust_remote_code`` can load it)."""
    base_classes = lns["base_classes"]
    if not all(_is_transformers_class(name) for name in base_classes.values()):
        return None
    return _build_classes(lns["base_model_type"], tuple(sorted(base_classes.items())))


def register(lns: dict) -> dict | None:
    """Register the LNS classes of one ``lns`` block with AutoConfig and the Auto model classes."""
    import transformers
    from transformers import AutoConfig

    classes = lns_classes(lns)
    if classes is None:
        return None
    config_class = classes["config"]
    try:
        AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
    except TypeError:  # older transformers without exist_ok
        if config_class.model_type not in transformers.CONFIG_MAPPING:
            AutoConfig.register(config_class.model_type, config_class)
    for auto_name, model_class in classes.items():
        if auto_name != "config":
            getattr(transformers, auto_name).register(config_class, model_class, exist_ok=True)
    return classes
