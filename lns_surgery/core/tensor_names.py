"""Which tensor in a checkpoint's files holds which module parameter.

transformers 5 renames some keys between the files and the modules while loading (Nemotron-H's
``backbone.`` is the module's ``model.``, DeepSeek-V4's ``attn_norm`` its ``input_layernorm``, GPT-2
files drop the base-model prefix). Rather than guess, this runs transformers' own renaming over the
file's keys, the same way ``from_pretrained`` does, and inverts it.
"""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)


def file_keys_by_module_key(model, file_keys) -> dict[str, str]:
    """``{module parameter name: file key}`` for every file key that loads into one parameter unchanged.

    Keys that a weight converter merges or splits (fused experts) are left out: they are not 1:1.
    """
    meta_state = dict(model.state_dict())
    prefix = getattr(model, "base_model_prefix", None)
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key
    except ImportError:  # an older transformers renames nothing but the base-model prefix
        return {_with_prefix(key, meta_state, prefix): key for key in file_keys}
    transforms = get_model_conversion_mapping(model)
    renamings = [entry for entry in transforms if isinstance(entry, WeightRenaming)]
    converters = [entry for entry in transforms if isinstance(entry, WeightConverter)]
    mapping = {}
    for key in file_keys:
        renamed, converted_by = rename_source_key(key, renamings, converters, prefix, meta_state)
        if renamed not in meta_state and key in meta_state:  # as transformers does: the key was right
            renamed, converted_by = key, None
        if converted_by is None and renamed in meta_state:
            mapping[renamed] = key
    return mapping


def _with_prefix(key: str, meta_state: dict, prefix: str | None) -> str:
    if key in meta_state or not prefix:
        return key
    return f"{prefix}.{key}" if f"{prefix}.{key}" in meta_state else key
