"""Tiny random models of every causal-LM and image-text-to-text ``model_type`` that transformers knows.

``build_tiny(model_type)`` starts from the family's default config and shrinks every size it knows
under whatever name the family uses (``_SCALAR_RULES``, ``_LIST_RULES``), recursively through the
sub-configs (text, vision, audio, ...). The text decoder keeps one block of every distinct kind its
default has (sliding/full attention, mamba/attention, dense/MoE, ...): its depth is the shortest prefix
of the default layer pattern that contains every kind. Families where the generic rules fail get a few
entries in ``_OVERRIDES`` (dotted config keys set after shrinking), ``_INIT`` (arguments of the default
config) or ``_BUILD_BY_NAME`` (built without the Auto class).

Norm weights are moved away from 1 and 0 so that scaling them is visible, and weight matrices that the
init leaves at zero get small random values. ``make_inputs`` gives the keyword arguments of a forward:
text only (plus what a family's text forward needs, ``_TEXT_INPUTS``), or with one image per sequence
for the families in ``_IMAGE_INPUTS``. ``ZOO_TYPES`` lists every type; ``UNBUILDABLE`` the ones that
cannot be built tiny or have no text-only forward, with the error seen by trying them (transformers
5.24). Every other type builds and runs a finite forward in well under a second, under 2M parameters.
"""

from __future__ import annotations

import copy
import functools
import inspect

import torch
import transformers
from transformers import CONFIG_MAPPING, AutoModelForCausalLM, AutoModelForImageTextToText
from transformers.models.auto import modeling_auto

CAUSAL = "AutoModelForCausalLM"
IMAGE_TEXT = "AutoModelForImageTextToText"

ZOO_TYPES = sorted(
    set(modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES) | set(modeling_auto.MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES)
)

VOCAB = 256
HIDDEN = 64
INTERMEDIATE = 128
MOE_INTERMEDIATE = 32
HEADS = 4
HEAD_DIM = 16
MAX_LAYERS = 8
IMAGE_SIZE = 32
PATCH_SIZE = 8
# Text tokens are drawn from [FIRST_TEXT_TOKEN, LAST_TEXT_TOKEN); the ids above hold the special tokens
# (allocated downwards from VOCAB - 1) and the image/audio code ranges of the families that have them.
FIRST_TEXT_TOKEN = 8
LAST_TEXT_TOKEN = 160

# ---------------------------------------------------------------------------------------------
# Generic size rules: key -> new value (a callable gets (old value, node dict)).
# ---------------------------------------------------------------------------------------------

_HIDDEN_KEYS = {
    "hidden_size", "d_model", "n_embd", "embed_dim", "embedding_dim", "hidden_size_global", "emb_dim", "dim",
    "d_embed", "word_embed_proj_dim", "text_hidden_size", "out_hidden_size", "vision_hidden_size",
    "projection_dim", "encoder_hidden_size", "projector_hidden_size", "projector_input_dim",
    "projector_output_dim", "vision_output_dim", "image_text_hidden_size", "attention_hidden_size", "lru_width",
    "patch_embed_hidden_size", "adapter_in_dim", "adapter_out_dim", "backbone_hidden_size",
    "image_token_embed_dim", "decoder_hidden_size", "router_hidden_size", "pooler_output_size",
    "hidden_size_per_layer_input", "ple_embed_dim", "output_dim", "input_embedding_size",
    "output_embedding_size", "projection_hidden_size", "embedding_size", "moe_latent_size", "hidden_dim",
    "text_embed_dim", "vision_embed_dim", "mm_hidden_size", "downsample_hidden_size", "adapter_input_size",
    "vector_quantization_hidden_dimension", "codebook_dim", "latent_channels",
    "output_channels", "num_filters", "upsample_groups", "pronunciation_embed_dim", "shape_embed_dim",
    "text_dim", "vision_dim", "width", "n_state",
}
_INTERMEDIATE_KEYS = {
    "intermediate_size", "ffn_dim", "encoder_ffn_dim", "decoder_ffn_dim", "n_inner", "d_ff", "dim_ff", "dff",
    "ffn_hidden_size", "intermediate_size_mlp", "dense_intermediate_size", "mlp_dim", "d_inner",
    "feed_forward_size", "decoder_intermediate_size", "projection_hidden_dim", "alignment_intermediate_size",
    "projection_intermediate_size", "prompt_mid_dim", "ext_pw_out_channel", "depthwise_separable_out_channel",
    "nemo_conv_channels", "conv_output_size", "merged_hidden_size", "vision_intermediate_size",
}
_MOE_INTERMEDIATE_KEYS = {
    "moe_intermediate_size", "shared_expert_intermediate_size", "expert_ffn_hidden_size",
    "moe_shared_expert_intermediate_size", "shared_experts_intermediate_size", "moe_hidden_size",
    "share_expert_dim", "shared_intermediate_size",
}
_HEAD_KEYS = {
    "num_attention_heads", "n_head", "n_heads", "num_heads", "encoder_attention_heads", "decoder_attention_heads",
    "attention_heads", "conf_num_attention_heads", "num_encoder_attention_heads", "num_decoder_attention_heads",
    "swa_num_attention_heads", "num_sliding_attention_heads", "index_n_heads", "linear_num_heads",
    "resampler_n_heads", "resampler_heads", "num_query_groups", "decoder_attention_num_groups",
    "heads_per_ngram",
}
_KV_HEAD_KEYS = {"num_key_value_heads", "num_kv_heads", "kv_n_heads", "swa_num_key_value_heads", "multi_query_group_num"}
_HEAD_DIM_KEYS = {
    "head_dim", "d_head", "dim_head", "d_kv", "kv_channels", "attention_head_dim", "attention_head_size",
    "mamba_d_head", "swa_head_dim", "linear_key_head_dim", "linear_value_head_dim", "linear_head_dim",
    "index_head_dim", "resampler_head_dim", "resampler_dim_head", "v_head_dim", "qk_head_dim", "mamba_head_dim",
    "mamba_headdim", "head_size", "attention_head_size_v",
}
_EXPERT_KEYS = {"num_experts", "n_routed_experts", "num_local_experts", "moe_num_experts", "num_centroids"}
_TOPK_KEYS = {"num_experts_per_tok", "moe_topk", "moe_k", "moe_top_k", "num_experts_per_token", "top_k"}
_SHARED_EXPERT_KEYS = {"n_shared_experts", "num_shared_experts", "moe_num_shared_experts"}
_RANK_KEYS = {
    "q_lora_rank", "kv_lora_rank", "o_lora_rank", "laurel_rank", "hc_lowrank", "adapter_rank", "loop_gate_rank",
    "gated_norm_rank", "d_rel",
}
_STATE_KEYS = {"state_size", "ssm_state_size", "mamba_d_state", "d_state"}
_POSITION_KEYS = {
    "max_position_embeddings", "n_positions", "n_ctx", "max_seq_len", "context_length", "max_target_positions",
    "model_max_length", "max_sequence_length", "seq_length", "max_len",
}
_WINDOW_KEYS = {
    "sliding_window", "sliding_window_size", "attention_window_size", "local_attention", "attention_chunk_size",
    "local_attention_window_len", "window_size", "local_attn_chunk_length", "lsh_attn_chunk_length",
    "keep_window_size", "rel_extent",
}
_CHUNK_KEYS = {"chunk_size", "mamba_chunk_size", "index_topk", "max_inference_chunksize", "conv_chunksize"}
_VOCAB_KEYS = {"vocab_size", "vocab_size_per_layer_input", "decoder_vocab_size", "unpadded_vocab_size"}
_SMALL_VOCAB_KEYS = {
    "pronunciation_vocab_size", "shape_vocab_size", "audio_vocab_size", "mel_vocab_size", "codebook_size",
    "num_embeddings", "position_bias_num_buckets", "ngram_vocab_size_base", "encoder_hash_byte_group_vocab",
}
_LAYER_KEYS = (
    "num_hidden_layers", "n_layer", "n_layers", "num_layers", "num_decoder_layers", "decoder_layers", "layers",
    "depth",
)
_AUX_LAYER_KEYS = {
    "encoder_layers", "num_encoder_layers", "conf_num_hidden_layers", "num_global_layers", "decoder_num_layers",
    "num_blocks", "resampler_depth", "aligner_num_add_layers", "num_lstm_layers", "num_res_blocks",
    "num_residual_layers", "num_nextn_predict_layers",
}
# per-layer index lists: the listed layers are of a special kind
_INDEX_LIST_KEYS = {
    "mlp_only_layers", "cross_attention_layers", "full_attn_idxs", "hybrid_layer_ids", "moe_layers",
    "ple_layer_ids", "fullatt_block_indexes", "global_attn_indexes", "intermediate_layers_indices",
    "deepstack_visual_indexes", "spatial_target_layers", "rope_scaling_layers",
}
# lists that are never per-layer
_NOT_PER_LAYER = {
    "eos_token_id", "image_grid_pinpoints", "supported_aspect_ratios", "norm_mean", "norm_std", "image_mean",
    "image_std", "time_step_limit", "visual_indicator_token_ids", "begin_suppress_tokens", "suppress_tokens",
    "architectures", "target_bandwidths", "upsampling_ratios", "channel_multiplier", "attn_resolutions",
}


def _pattern_features(d: dict, i: int, n_layers: int) -> tuple:
    """The kind of layer ``i`` as far as scalar pattern fields (not lists) decide it."""
    out = []

    def get(key):
        value = d.get(key)
        return value if isinstance(value, int) and not isinstance(value, bool) else None

    for key in ("first_k_dense_replace", "num_dense_layers"):
        if get(key):
            out.append(i < get(key))
    for key in ("decoder_sparse_step", "interleave_moe_layer_step", "no_rope_layer_interval", "moe_layer_interval",
                "layer_group_size", "n_layers_per_attn_res_block", "global_attn_every_n_layers",
                "cross_layer_interval"):
        if get(key) and get(key) > 1 and not (key == "moe_layer_interval" and get("moe_layer_start_index") is None):
            out.append((i + 1) % get(key) == 0)
    if get("moe_layer_start_index") is not None:
        out.append(i >= get("moe_layer_start_index"))
    if not d.get("layer_types"):
        for key in ("sliding_window_pattern", "_sliding_window_pattern"):
            if get(key) and get(key) > 1:
                out.append((i + 1) % get(key) == 0)
    for period, offset in (("attn_layer_period", "attn_layer_offset"), ("expert_layer_period", "expert_layer_offset")):
        if get(period):
            out.append(i % get(period) == (get(offset) or 0))
    return tuple(out)


def _layer_count(d: dict):
    for key in _LAYER_KEYS:
        value = d.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return key, value
    return None, None


def _per_layer_lists(d: dict, n_layers: int) -> list[str]:
    keys = []
    for key, value in d.items():
        if key in _NOT_PER_LAYER or key in _INDEX_LIST_KEYS or not isinstance(value, (list, tuple)):
            continue
        if len(value) == n_layers and n_layers >= 2 and all(
            isinstance(v, (str, int, float, bool, type(None))) for v in value
        ):
            keys.append(key)
    return keys


def _shrink_layers(d: dict, is_decoder: bool) -> None:
    """Keep every kind of block: the depth becomes the shortest prefix of the default pattern that holds every
    kind; where the pattern is given by lists only (no scalar period), a subset of layers is taken instead when
    the prefix would be deeper than MAX_LAYERS, or when the shared-KV suffix of Gemma-3n-like models needs it."""
    key, n_layers = _layer_count(d)
    if n_layers is None:  # depth given only by a layer-type list (nemotron_h)
        for k in ("layer_types", "layers_block_type", "block_types"):
            if isinstance(d.get(k), (list, tuple)) and d[k]:
                n_layers = len(d[k])
                break
        if n_layers is None:
            return
    per_layer = _per_layer_lists(d, n_layers)
    index_lists = {k: list(d[k]) for k in _INDEX_LIST_KEYS if isinstance(d.get(k), (list, tuple))}
    per_layer_config = d.get("per_layer_config") if isinstance(d.get("per_layer_config"), dict) else {}
    overrides = {int(k): repr(sorted(v.items())) if isinstance(v, dict) else repr(v) for k, v in per_layer_config.items()}
    shared = d.get("num_kv_shared_layers") if isinstance(d.get("num_kv_shared_layers"), int) else 0
    if is_decoder:
        scalar = [_pattern_features(d, i, n_layers) for i in range(n_layers)]
        kinds = []
        for i in range(n_layers):
            kinds.append(
                tuple(d[k][i] for k in per_layer if k != "kv_source_layers")
                + tuple(i in v for v in index_lists.values())
                + scalar[i]
                + ((d["kv_source_layers"][i] == i,) if "kv_source_layers" in per_layer else ())
                + ((overrides.get(i),) if overrides else ())
                + ((i >= n_layers - shared,) if 0 < shared < n_layers else ())
            )
        first = {}
        for i, kind in enumerate(kinds):
            first.setdefault(kind, i)
        prefix = min(n_layers, max(2, max(first.values()) + 1))
        subset_ok = not any(scalar[0]) and not any(any(f) for f in scalar)
        if (prefix > MAX_LAYERS or 0 < shared < n_layers) and subset_ok:
            selected = sorted(first.values())
            extra = [i for i in range(n_layers) if i not in selected]
            while len(selected) < 2 and extra:
                selected = sorted(selected + [extra.pop(0)])
        else:
            selected = list(range(prefix))
    else:
        selected = list(range(min(2, n_layers)))
    new_n = len(selected)
    position = {old: new for new, old in enumerate(selected)}
    if key is not None:
        d[key] = new_n
    for k in per_layer:
        values = [d[k][i] for i in selected]
        if k == "kv_source_layers":
            values = [position.get(v, j) if isinstance(v, int) else v for j, v in enumerate(values)]
        d[k] = values if isinstance(d[k], list) else tuple(values)
    for k, values in index_lists.items():
        if is_decoder:
            kept = [position[v] for v in values if isinstance(v, int) and v in position]
        else:  # taps into an encoder: keep their count where possible, spread over the new depth
            kept = []
            for v in values:
                v = min(new_n - 1, v * new_n // max(n_layers, 1)) if isinstance(v, int) and v >= 0 else v
                if v not in kept:
                    kept.append(v)
        d[k] = kept if isinstance(d[k], list) else tuple(kept)
    if per_layer_config:
        d["per_layer_config"] = {
            (f"{position[int(k)]:02d}" if isinstance(k, str) else position[int(k)]): v
            for k, v in per_layer_config.items() if int(k) in position
        }
    if shared:
        d["num_kv_shared_layers"] = new_n if shared >= n_layers else sum(1 for i in selected if i >= n_layers - shared)
    for k in ("moe_layer_end_index", "max_window_layers", "loop_layer_index_end"):
        if isinstance(d.get(k), int) and d[k] >= new_n:
            d[k] = new_n - 1 if k != "max_window_layers" else new_n
    for k in ("loop_layer_index_start",):
        if isinstance(d.get(k), int) and d[k] >= new_n:
            d[k] = 0


def _is_token_key(key: str) -> bool:
    k = key.lower()
    if k in {"unk_index", "mask_index", "im_start_id", "im_end_id", "im_newline_id", "image_patch_id", "lang_id"}:
        return True
    if "token" in k and (k.endswith("_id") or k.endswith("_index") or k.endswith("_ids") or k.endswith("_idx")):
        return not k.startswith("num_") and "layer" not in k
    return False


class _TokenMap:
    """Maps the special token ids of a default config into the tiny vocabulary, consistently."""

    def __init__(self):
        self.map: dict[int, int] = {}
        self.next_high = VOCAB - 1

    def __call__(self, value: int) -> int:
        if value < 0:
            return value
        if value < FIRST_TEXT_TOKEN:
            return value
        if value not in self.map:
            self.map[value] = self.next_high
            self.next_high -= 1
        return self.map[value]


def _at_most(n: int):
    return lambda value: min(value, n)


def _rules(*groups) -> dict:
    """key -> (applies above this value, new value or callable(old value)); the first group naming a key wins."""
    table = {}
    for keys, above, new in groups:
        for key in keys:
            table.setdefault(key, (above, new))
    return table


# Scalar size rules, applied to every int field of every (sub-)config. Sizes only shrink where the default might
# already be small (counts of experts, windows, positions); the widths are set outright so that sizes the
# default ties together (projector in == vision out == hidden) stay equal.
_SCALAR_RULES = _rules(
    (_HIDDEN_KEYS, 0, HIDDEN),
    (_INTERMEDIATE_KEYS, 0, INTERMEDIATE),
    (_MOE_INTERMEDIATE_KEYS, 0, MOE_INTERMEDIATE),
    (_HEAD_DIM_KEYS, 0, HEAD_DIM),
    (("qk_rope_head_dim", "qk_nope_head_dim"), 0, 8),
    (_EXPERT_KEYS, 0, _at_most(4)),
    (("zero_expert_num",), 0, _at_most(2)),  # longcat: zero-compute experts still get router rows and weights
    (_TOPK_KEYS, 0, _at_most(2)),
    (_SHARED_EXPERT_KEYS, 0, 1),
    (("n_group", "num_expert_group"), 1, 2),
    (("topk_group",), 1, 1),
    (_RANK_KEYS, 0, 16),
    (_STATE_KEYS, 0, 8),
    (_POSITION_KEYS, 0, _at_most(256)),
    (_WINDOW_KEYS, 0, _at_most(4)),
    (_CHUNK_KEYS, 0, _at_most(16)),
    (_VOCAB_KEYS, 0, VOCAB),
    (_SMALL_VOCAB_KEYS, 0, _at_most(64)),
    (("num_nextn_predict_layers", "num_lstm_layers", "num_res_blocks"), 1, 1),
    (_AUX_LAYER_KEYS, 1, 2),
    (("image_size", "img_size", "crop_size", "resolution", "min_image_size"), 0, IMAGE_SIZE),
    (("patch_size",), 0, _at_most(PATCH_SIZE)),
    (("num_position_embeddings", "num_patches", "max_num_patches", "num_image_tokens", "image_seq_length"), 0,
     (IMAGE_SIZE // PATCH_SIZE) ** 2),
    # tokens per image after the projector's pooling (gemma3: a square number <= patches per image)
    (("mm_tokens_per_image",), 0, (IMAGE_SIZE // PATCH_SIZE // 2) ** 2),
    (("base_channels",), 32, 32),  # VQ encoders use GroupNorm(32)
    (("max_image_size", "max_img_size"), 0, 2 * IMAGE_SIZE),
    (("img_max_token_num", "position_embedding_size"), 0, 64),
    (("max_vit_seq_len",), 0, 256),
    (("pos_emb_height", "pos_emb_width"), 0, IMAGE_SIZE // PATCH_SIZE * 2),
    (("time_step_rank", "mamba_dt_rank"), 0, 8),
    (("mamba_n_heads", "mamba_num_heads", "linear_num_key_heads", "linear_num_value_heads", "n_mamba_heads"), 0,
     _at_most(HEADS)),
    (("n_groups", "mamba_n_groups", "mamba_ngroups"), 1, 2),
    (("num_query_tokens",), 0, 4),
)
# list-valued sizes: key -> new list of the same length
_LIST_RULES = {
    **{k: lambda n: [INTERMEDIATE] * n for k in ("intermediate_size",)},
    **{k: lambda n: [MOE_INTERMEDIATE] * n for k in ("moe_intermediate_size",)},  # ernie4.5-VL: text, vision
    **{k: lambda n: [IMAGE_SIZE] * n for k in ("image_size", "img_size")},
    **{k: lambda n: [max(16, HIDDEN >> (n - 1 - i)) for i in range(n)]  # 16, ..., 64
       for k in ("embed_dim", "hidden_sizes", "downsample_channels", "dims", "channels")},
    **{k: lambda n: [max(1, (HIDDEN >> (n - 1 - i)) // 16) for i in range(n)] for k in ("num_heads", "num_groups")},
    **{k: lambda n: [1] * n for k in ("depths", "channel_multiplier")},
}


def _shrink_node(d: dict, is_decoder: bool, tokens: _TokenMap, path: str) -> None:
    orig = dict(d)
    for key, value in list(d.items()):
        if isinstance(value, bool) or value is None or (isinstance(value, dict) and "model_type" in value):
            continue
        if _is_token_key(key):
            if isinstance(value, int):
                d[key] = tokens(value)
            elif isinstance(value, (list, tuple)) and all(isinstance(v, int) for v in value):
                d[key] = type(value)(tokens(v) for v in value)
            continue
        if isinstance(value, (list, tuple)):
            if key in _LIST_RULES and value and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
                d[key] = type(value)(_LIST_RULES[key](len(value)))
            continue
        if not isinstance(value, int) or value <= 0:
            continue
        if key == "attention_hidden_size" and isinstance(orig.get("hidden_size"), int):
            d[key] = HIDDEN * max(1, round(value / orig["hidden_size"]))  # zamba: 2 x hidden
        elif key in _HEAD_KEYS:
            d[key] = min(value, HEADS)
        elif key in _KV_HEAD_KEYS:  # MHA stays MHA, MQA stays MQA, GQA becomes 2 groups
            n_heads = next((orig[k] for k in ("num_attention_heads", "n_head", "n_heads", "num_heads")
                            if isinstance(orig.get(k), int)), None)
            d[key] = HEADS if value == n_heads else 1 if value == 1 else 2
        elif key in _SCALAR_RULES:
            above, new = _SCALAR_RULES[key]
            if value > above:
                d[key] = new(value) if callable(new) else new
        elif "feature_layer" in key:
            d[key] = -1
    _fix_relations(d, orig)
    if isinstance(d.get("per_layer_config"), dict):
        for layer, overrides in d["per_layer_config"].items():
            if isinstance(overrides, dict):
                _shrink_node(overrides, False, tokens, path + ".per_layer_config")
    if path.endswith(".per_layer_config"):
        return
    _shrink_layers(d, is_decoder)


def _fix_relations(d: dict, orig: dict) -> None:
    """Sizes that the generic rules set independently but that a family ties together."""
    hidden = d.get("hidden_size", HIDDEN) if isinstance(d.get("hidden_size"), int) else HIDDEN
    # values that the default leaves unset but that the modelling code needs
    if "head_dim" in d and d["head_dim"] is None and any(isinstance(d.get(k), int) for k in ("num_attention_heads", "num_heads")):
        d["head_dim"] = HEAD_DIM
    if "num_key_value_heads" in d and d["num_key_value_heads"] is None and isinstance(d.get("num_attention_heads"), int):
        d["num_key_value_heads"] = d["num_attention_heads"]
    has_experts = any(isinstance(d.get(k), int) and d[k] > 1 for k in _EXPERT_KEYS)
    for key in ("num_experts_per_tok",):
        if key in d and d[key] is None and has_experts:
            d[key] = 2
    # equal head sizes in the default stay equal (MLA: head_dim == qk_rope_head_dim, v == nope, ...)
    dim_keys = ["qk_rope_head_dim", "qk_nope_head_dim", "head_dim", "v_head_dim", "linear_key_head_dim",
                "linear_value_head_dim", "index_head_dim", "kv_channels", "attention_head_dim", "swa_head_dim"]
    present = [k for k in dim_keys if isinstance(orig.get(k), int) and isinstance(d.get(k), int)]
    for i, a in enumerate(present):
        for b in present[i + 1:]:
            if orig[a] == orig[b] and d[a] != d[b]:
                d[b] = d[a]
    if isinstance(d.get("qk_head_dim"), int) and isinstance(d.get("qk_rope_head_dim"), int) and isinstance(d.get("qk_nope_head_dim"), int):
        d["qk_head_dim"] = d["qk_rope_head_dim"] + d["qk_nope_head_dim"]
    if isinstance(d.get("rotary_dim"), int) and d["rotary_dim"] > HEAD_DIM // 2:
        d["rotary_dim"] = HEAD_DIM // 2
    # mamba: heads x head dim must equal expand x hidden
    expand = d.get("mamba_expand", d.get("expand", 2))
    expand = expand if isinstance(expand, (int, float)) and not isinstance(expand, bool) and expand else 2
    inner = int(expand * hidden)
    if "mamba_d_ssm" in d and d["mamba_d_ssm"] is not None:
        d["mamba_d_ssm"] = inner
    for n_key, d_key in (("mamba_num_heads", "mamba_head_dim"), ("mamba_n_heads", "mamba_d_head"),
                         ("mamba_n_heads", "mamba_headdim"), ("n_mamba_heads", "mamba_headdim")):
        if isinstance(d.get(n_key), int) and isinstance(d.get(d_key), int):
            d[n_key] = max(1, inner // d[d_key])
    if (isinstance(d.get("num_heads"), int) and isinstance(d.get("head_dim"), int) and "expand" in d
            and any(k in d for k in ("state_size", "ssm_state_size")) and "num_attention_heads" not in d):
        d["num_heads"] = max(1, inner // d["head_dim"])  # mamba2
    # Qwen2.5-VL-like towers: window_size is in pixels, a multiple of patch x merge (not a token count); one
    # merged token per window gives a 2 x 2 grid of windows on the tiny image
    if all(isinstance(d.get(k), int) for k in ("window_size", "patch_size", "spatial_merge_size")):
        d["window_size"] = d["patch_size"] * d["spatial_merge_size"]
    _fix_rope(d, orig)


def _fix_rope(d: dict, orig: dict) -> None:
    """Multimodal RoPE sections must add up to half the (new) rotary dimension."""
    old_dim = orig.get("qk_rope_head_dim") or orig.get("head_dim")
    if not isinstance(old_dim, int) and isinstance(orig.get("hidden_size"), int) and isinstance(orig.get("num_attention_heads"), int):
        old_dim = orig["hidden_size"] // orig["num_attention_heads"]
    new_dim = d.get("qk_rope_head_dim") or d.get("head_dim") or HEAD_DIM
    if not isinstance(old_dim, int) or not isinstance(new_dim, int) or old_dim == new_dim:
        return

    def fix(params):
        if not isinstance(params, dict):
            return
        for key in ("mrope_section",):
            section = params.get(key)
            if isinstance(section, (list, tuple)) and section and all(isinstance(v, int) for v in section):
                total = sum(section) * new_dim // old_dim
                total = max(total, len(section))
                raw = [v * total / sum(section) for v in section]
                new = [max(1, int(v)) for v in raw]
                order = sorted(range(len(raw)), key=lambda j: raw[j] - int(raw[j]), reverse=True)
                j = 0
                while sum(new) < total:
                    new[order[j % len(new)]] += 1
                    j += 1
                while sum(new) > total:
                    k = max(range(len(new)), key=lambda j: new[j])
                    new[k] -= 1
                params[key] = type(section)(new)
        for value in params.values():
            if isinstance(value, dict):
                fix(value)

    fix(d.get("rope_parameters"))


def _walk(d: dict, tokens: _TokenMap, path: str, decoder_path: str) -> None:
    _shrink_node(d, path == decoder_path, tokens, path)
    for key, value in d.items():
        if isinstance(value, dict) and "model_type" in value:
            _walk(value, tokens, f"{path}.{key}" if path else key, decoder_path)


def _decoder_path(d: dict) -> str:
    for key in ("text_config", "decoder", "decoder_config", "language_config", "llm_config"):
        if isinstance(d.get(key), dict) and "model_type" in d[key]:
            inner = _decoder_path(d[key])
            return key + ("." + inner if inner else "")
    return ""


def _set_path(d: dict, dotted: str, value) -> None:
    parts = dotted.split(".")
    for part in parts[:-1]:
        d = d[part]
    d[parts[-1]] = value


# ---------------------------------------------------------------------------------------------
# Per-family fixes where the generic rules fail: dotted key -> value, applied after shrinking.
# ---------------------------------------------------------------------------------------------
_ROPE_FULL = {"full_attention": {"rope_type": "default", "rope_theta": 10000.0}}
_QSA = {"indexer_n_heads": 2, "indexer_kv_heads": 1, "indexer_head_dim": 16, "indexer_budget": 8, "indexer_compress_ratio": 2}
_OVERRIDES: dict[str, dict] = {
    "qwen4_exp_text": dict(_QSA),
    "qwen4_exp": {f"text_config.{k}": v for k, v in _QSA.items()},
    "cohere_compass_text": {"rope_parameters": _ROPE_FULL},
    "cohere_compass": {"text_config.rope_parameters": _ROPE_FULL},
    "step3p7": {"text_config.sliding_window": 4},
    "lfm2_moe": {"num_hidden_layers": 3, "layer_types": ["conv", "full_attention", "conv"]},
    "deepseek_ocr2": {"text_config.mlp_layer_types": ["dense", "sparse"]},
    "zamba": {"num_hidden_layers": 4, "layers_block_type": ["mamba", "hybrid", "mamba", "hybrid"]},
    "zamba2": {"attention_head_dim": 2 * HIDDEN // HEADS},
    "dbrx": {"attn_config.clip_qkv": 8.0},
    # its indexed attention validates the indexer layers, pool and compression against the (shrunk) layer list
    "kolibri1_1": {"index_layers": [2], "index_num_heads": 2, "index_compression": 2, "index_pool_size": 8,
                   "index_topk": 4, "index_num_local_tokens": 2, "index_num_sink_tokens": 1},
    "dory": {"num_hidden_layers": 4, "n_input_layers": 1, "n_recurrent_layers": 2, "n_output_layers": 1,
             "layer_types": ["sliding_attention", "sliding_attention", "sliding_attention", "full_attention"]},
    "dots1": {"n_routed_experts": 4, "num_experts_per_tok": 2, "n_shared_experts": 1},
    "diffusion_gemma": {"text_config.num_experts": 4, "text_config.top_k_experts": 2,
                        "text_config.moe_intermediate_size": MOE_INTERMEDIATE},
    "granite4_vision": {"deepstack_layer_map": [[0, 0], [1, 1]], "spatial_target_layers": [0, 1], "downsample_rate": "1/2"},
    "inkling2_loop_text": {"n_layers_per_attn_res_block": 2, "loop_layer_index_start": 2, "loop_layer_index_end": 4},
    "inkling2_loop": {"text_config.n_layers_per_attn_res_block": 2, "text_config.loop_layer_index_start": 2,
                      "text_config.loop_layer_index_end": 4},
    "molmo2": {"adapter_config.vision_feature_layer": [-1, -2]},
    "reformer": {"axial_pos_embds_dim": [32, 32], "axial_pos_shape": [4, 4], "max_position_embeddings": 16},
    # the audio tokenizer doubles num_filters at each of its 4 upsampling ratios: 4 -> 64 channels at the end
    "apertus1p5": {"vision_config.codebook_size": 32, "audio_config.codebook_size": 32, "audio_config.num_filters": 4,
                   "image_token_offset": LAST_TEXT_TOKEN, "audio_token_offset": LAST_TEXT_TOKEN + 32},
    # the image vocabulary: 64 VQ codes on ids [LAST_TEXT_TOKEN, LAST_TEXT_TOKEN + 64)
    "chameleon": {"vocabulary_map": {"<image>": VOCAB - 1, **{
        "IMGIMG" + "".join(chr(ord("A") + int(c)) for c in str(i)) + "Z": LAST_TEXT_TOKEN + i for i in range(64)}},
        "image_token_id": VOCAB - 1},
    "emu3": {"vocabulary_map": {"<image>": VOCAB - 1, "<|extra_200|>": VOCAB - 2, **{
        f"<|visual token{i:06d}|>": LAST_TEXT_TOKEN + i for i in range(64)}}, "image_token_id": VOCAB - 1},
    # block_types cycles (recurrent, recurrent, attention): three layers hold both kinds
    "recurrent_gemma": {"num_hidden_layers": 3},
    # the defaults are all-Mamba, but the released checkpoints are hybrids (and an all-Mamba cache breaks the
    # forward: get_seq_length needs an attention layer), so one attention layer is added
    "bamba": {"attn_layer_indices": [1]},
    "granitemoehybrid": {"layer_types": ["linear_attention", "full_attention"]},
    # the config rounds hidden * qk_dim_factor up to a multiple of 64 for the cache, the model does not
    "xlstm": {"qk_dim_factor": 1.0},
    # the projector's post convolutions are sized for a 1024-wide decoder
    "pp_formulanet": {"vision_config.post_conv_in_channels": HIDDEN, "vision_config.post_conv_mid_channels": HIDDEN,
                      "vision_config.post_conv_out_channels": HIDDEN},
}
_MROPE = {  # families whose modelling code falls back to a hard-coded M-RoPE split sized for the real head_dim
    "qwen2_vl": [2, 3, 3], "qwen2_5_vl": [2, 3, 3], "qwen2_5_omni_thinker": [2, 3, 3], "paddleocr_vl": [2, 3, 3],
    "glm4v": [2, 3, 3], "glm46v": [2, 3, 3], "glmga": [2, 3, 3], "glm_ocr": [2, 3, 3], "glm4v_moe": [1, 1, 2],
    "ernie4_5_vl_moe": [3, 3, 2], "hunyuan_vl": [2, 2, 2, 2],
}
for _t, _section in _MROPE.items():
    _OVERRIDES.setdefault(_t, {})["text_config.rope_parameters.mrope_section"] = _section
# keyword arguments for the default config, where the bare default does not validate or leaves a tower out
_INIT: dict[str, dict] = {
    "gemma4_assistant": {"text_config": {"hidden_size_per_layer_input": 0, "vocab_size_per_layer_input": 0}},
    "gemma4": {"vision_config": {}},  # the default has no vision tower (vision_config is optional)
}


def _dbrx_rope(config):
    config.attn_config.rope_theta = config.rope_parameters.get("rope_theta", 10000.0) if config.rope_parameters else 10000.0


# edits of the built config object, for attributes the modelling code reads but the config never sets
_POST_CONFIG: dict = {"dbrx": _dbrx_rope}


def tiny_config_dict(model_type: str) -> dict:
    config = CONFIG_MAPPING[model_type](**_INIT.get(model_type, {}))
    d = copy.deepcopy(config.to_dict())
    tokens = _TokenMap()
    _walk(d, tokens, "", _decoder_path(d))
    if "is_decoder" in d and auto_class_name(model_type) == CAUSAL:
        d["is_decoder"] = True
    for dotted, value in _OVERRIDES.get(model_type, {}).items():
        _set_path(d, dotted, value)
    return d


def tiny_config(model_type: str):
    d = tiny_config_dict(model_type)
    d.pop("model_type", None)
    d.pop("transformers_version", None)
    config = CONFIG_MAPPING[model_type](**d)
    if model_type in _POST_CONFIG:
        _POST_CONFIG[model_type](config)
    return config


def auto_class_name(model_type: str) -> str:
    return IMAGE_TEXT if model_type in modeling_auto.MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES else CAUSAL


def perturb_norms(model, seed: int = 0) -> None:
    """Move every norm's parameters away from their init (1 or 0) so that scaling them is visible."""
    generator = torch.Generator().manual_seed(seed)
    done = set()
    with torch.no_grad():
        for name, module in model.named_modules():
            leaf = name.rsplit(".", 1)[-1]
            if "norm" in type(module).__name__.lower() or "norm" in leaf.lower() or leaf.startswith("ln"):
                for param in module.parameters():
                    if id(param) in done or not param.is_floating_point():
                        continue
                    done.add(id(param))
                    param.add_(torch.randn(param.shape, generator=generator).to(param.dtype) * 0.1)


def fill_zero_matrices(model, seed: int = 0) -> None:
    """Give small random values to weight matrices that the family's init leaves all zero (Gemma 3's image
    projection, routers, relative position tables, ...), so that every path of the random model carries signal."""
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for param in model.parameters():
            if param.ndim >= 2 and param.is_floating_point() and not param.any():
                param.copy_(torch.randn(param.shape, generator=generator).to(param.dtype) * 0.02)


# edits of the built model that its forward needs
_POST_BUILD: dict = {"xmod": lambda model: model.set_default_language(model.config.languages[0])}


# families that the Auto class cannot build from the default config; they are built by the class the auto mapping
# names, from the given part of the config ("" for all of it)
_BUILD_BY_NAME = {
    "evolla": "",  # two model types share EvollaConfig and the Auto lookup by config class picks "EvollaModel"
    "musicgen": "decoder",  # MusicgenForCausalLM takes the decoder part of the composite MusicgenConfig
    "musicgen_melody": "decoder",
}


def build_tiny(model_type: str, seed: int = 0):
    """A tiny random model of ``model_type`` in fp32 eval mode on CPU, and the Auto class name it uses."""
    name = auto_class_name(model_type)
    config = tiny_config(model_type)
    torch.random.default_generator.manual_seed(seed)  # torch.manual_seed also seeds CUDA lazily: slow
    if model_type in _BUILD_BY_NAME:
        part = _BUILD_BY_NAME[model_type]
        names = (modeling_auto.MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES if name == IMAGE_TEXT
                 else modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
        model_class = getattr(transformers, names[model_type])
        model = model_class._from_config(getattr(config, part) if part else config, dtype=torch.float32)
    else:
        auto = AutoModelForImageTextToText if name == IMAGE_TEXT else AutoModelForCausalLM
        model = auto.from_config(config, dtype=torch.float32)
    model = model.float().eval()
    if model_type in _POST_BUILD:
        _POST_BUILD[model_type](model)
    perturb_norms(model, seed)
    fill_zero_matrices(model, seed)
    return model, name


def _special_ids(config) -> set[int]:
    ids = set()

    def walk(c, seen):
        if id(c) in seen:
            return
        seen.add(id(c))
        for key, value in vars(c).items():
            if hasattr(value, "to_dict") and hasattr(value, "model_type"):
                walk(value, seen)
            elif _is_token_key(key):
                if isinstance(value, int):
                    ids.add(value)
                elif isinstance(value, (list, tuple)):
                    ids.update(v for v in value if isinstance(v, int))

    walk(config, set())
    return ids


def text_token_ids(model, batch: int = 2, length: int = 10, seed: int = 0) -> torch.Tensor:
    special = _special_ids(model.config)
    vocab = VOCAB
    text_config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    vocab = min(vocab, getattr(text_config, "vocab_size", vocab) or vocab)
    allowed = [t for t in range(FIRST_TEXT_TOKEN, min(LAST_TEXT_TOKEN, vocab)) if t not in special]
    generator = torch.Generator().manual_seed(seed)
    picks = torch.randint(0, len(allowed), (batch, length), generator=generator)
    return torch.tensor(allowed)[picks]


def _bbox(model, input_ids):
    """UDOP's layout: one (x0, y0, x1, y1) box per token in [0, 1] page coordinates, left to right on a line."""
    length = input_ids.shape[1]
    x0 = torch.arange(length, dtype=torch.float32) / length
    boxes = torch.stack([x0, torch.full_like(x0, 0.1), x0 + 0.5 / length, torch.full_like(x0, 0.2)], dim=-1)
    return {"bbox": boxes.expand(input_ids.shape[0], -1, -1).clone()}


def _no_cache(model, input_ids):
    return {"use_cache": False}


def _codebook_rows(model, input_ids):
    """MusicGen decoders take one row per (sequence, codebook)."""
    return {"input_ids": input_ids.repeat_interleave(model.config.num_codebooks, dim=0)}


# extra keyword arguments of a text-only forward, by ``model.config.model_type``: callable(model, input_ids)
_TEXT_INPUTS: dict = {
    # the forward's default cache path fails: blt's DynamicCache(config) asks BltConfig for num_hidden_layers
    # (AttributeError), hrm_text's cache.update indexes past its layers (IndexError)
    "blt": _no_cache,
    "hrm_text": _no_cache,
    "musicgen_decoder": _codebook_rows,
    "musicgen_melody_decoder": _codebook_rows,
    "udop": _bbox,
}


def make_inputs(model, auto_class_name: str, with_image: bool = False, seed: int = 0):
    """Keyword arguments of a forward; with ``with_image`` also an image, or None where none can be made."""
    input_ids = text_token_ids(model, seed=seed)
    kwargs = {"input_ids": input_ids}
    if "decoder_input_ids" in inspect.signature(model.forward).parameters:  # encoder-decoder: same text both sides
        kwargs["decoder_input_ids"] = input_ids
    if model.config.model_type in _TEXT_INPUTS:
        kwargs.update(_TEXT_INPUTS[model.config.model_type](model, input_ids))
    if not with_image:
        return kwargs
    maker = _IMAGE_INPUTS.get(model.config.model_type) if auto_class_name == IMAGE_TEXT else None
    if maker is None:
        return None
    kwargs.update(maker(model, input_ids))
    return kwargs


# ---------------------------------------------------------------------------------------------
# Image inputs: pixels shaped as the family's processor would give them, and the image placeholder run as long as
# the vision tower's output (measured by running get_image_features), so no processor or hub file is needed.
# ---------------------------------------------------------------------------------------------


def _config_token(config, *keys):
    for key in keys:
        value = getattr(config, key, None)
        if isinstance(value, int):
            return value
    raise KeyError(f"{type(config).__name__} has none of {keys}")


def _features_per_image(model, batch: int, pixel_kwargs: dict) -> int:
    with torch.no_grad():
        out = model.get_image_features(**pixel_kwargs)
    features = getattr(out, "pooler_output", None)
    if features is None:
        features = out.last_hidden_state if hasattr(out, "last_hidden_state") else out
    if isinstance(features, (list, tuple)):
        rows = sum(f.reshape(-1, f.shape[-1]).shape[0] for f in features)
    else:
        rows = features.reshape(-1, features.shape[-1]).shape[0]
    return rows // batch


def _with_image(model, input_ids, pixel_kwargs: dict, type_ids_key: str | None = None,
                start_keys: tuple = (), end_keys: tuple = ()) -> dict:
    """One image per sequence, in front of the text: [start] image * n [end] text."""
    config = model.config
    batch = input_ids.shape[0]
    n = _features_per_image(model, batch, pixel_kwargs)
    image_token = _config_token(config, "image_token_id", "image_token_index")

    def column(token, width=1):
        return torch.full((batch, width), token, dtype=input_ids.dtype)

    parts = [column(_config_token(config, *start_keys))] if start_keys else []
    parts.append(column(image_token, n))
    if end_keys:
        parts.append(column(_config_token(config, *end_keys)))
    ids = torch.cat(parts + [input_ids], dim=1)
    kwargs = {"input_ids": ids, **pixel_kwargs}
    if type_ids_key:  # what the processor returns next to the ids: 1 on image placeholders, 0 elsewhere
        kwargs[type_ids_key] = (ids == image_token).long()
    return kwargs


def _pixels(*shape, seed: int = 0) -> torch.Tensor:
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed))


def _square_image(model, input_ids, **options):
    """(batch, 3, size, size) pixels at the vision tower's image size (LLaVA, Gemma 3, ...)."""
    size = model.config.vision_config.image_size
    pixel_kwargs = {"pixel_values": _pixels(input_ids.shape[0], 3, size, size)}
    if options.pop("image_sizes", False):  # Pixtral-based towers take each image's (height, width)
        pixel_kwargs["image_sizes"] = torch.tensor([[size, size]] * input_ids.shape[0])
    return _with_image(model, input_ids, pixel_kwargs, **options)


def _qwen_image(model, input_ids, start_keys=("vision_start_token_id",), end_keys=("vision_end_token_id",),
                type_ids_key="mm_token_type_ids"):
    """Qwen-VL (and GLM-4V, ...): flattened (temporal x patch x patch) patches of every image, and each image's
    (t, h, w) grid; the token type ids let the model compute the M-RoPE positions of the image."""
    vision = model.config.vision_config
    side = IMAGE_SIZE // vision.patch_size  # patches per side, a multiple of spatial_merge_size
    batch = input_ids.shape[0]
    channels = getattr(vision, "in_channels", None) or getattr(vision, "num_channels", 3)
    temporal = getattr(vision, "temporal_patch_size", 1)
    pixel_kwargs = {
        "pixel_values": _pixels(batch * side * side, channels * temporal * vision.patch_size ** 2),
        "image_grid_thw": torch.tensor([[1, side, side]] * batch),
    }
    return _with_image(model, input_ids, pixel_kwargs, type_ids_key=type_ids_key, start_keys=start_keys,
                       end_keys=end_keys)


def _gemma4_image(model, input_ids):
    """Gemma 4: (batch, patches, 3 x patch x patch) pixels with each patch's (x, y); the tower average-pools
    pooling_kernel_size^2 patches into one soft token, so the grid side is a multiple of the kernel."""
    vision = model.config.vision_config
    side = 2 * vision.pooling_kernel_size
    batch = input_ids.shape[0]
    ys, xs = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    positions = torch.stack([xs.flatten(), ys.flatten()], dim=-1)
    pixel_kwargs = {
        "pixel_values": _pixels(batch, side * side, 3 * vision.patch_size ** 2),
        "image_position_ids": positions.expand(batch, -1, -1).clone(),
    }
    return _with_image(model, input_ids, pixel_kwargs, type_ids_key="mm_token_type_ids",
                       start_keys=("boi_token_id",), end_keys=("eoi_token_id",))


_sized_square = functools.partial(_square_image, image_sizes=True)
_glm_image = functools.partial(_qwen_image, start_keys=("image_start_token_id",), end_keys=("image_end_token_id",))

# by ``model.config.model_type``: callable(model, input_ids) -> the keyword arguments of an image+text forward.
# Each one was checked to run and to change the text logits when the pixels change.
_IMAGE_INPUTS: dict = {
    **dict.fromkeys(["llava", "aya_vision", "cohere2_vision", "ovis2", "paligemma", "shieldgemma2", "step3p7",
                     "video_llava"], _square_image),
    "gemma3": functools.partial(_square_image, type_ids_key="token_type_ids", start_keys=("boi_token_index",),
                                end_keys=("eoi_token_index",)),
    **dict.fromkeys(["mistral3", "mistral_large4", "lighton_ocr"], _sized_square),
    **dict.fromkeys(["qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe", "qwen3_5", "qwen3_5_moe", "qwen4_exp",
                     "cohere_compass", "cosmos3_omni", "lfm3_vl"], _qwen_image),
    **dict.fromkeys(["glm4v", "glm46v", "glm4v_moe", "glm5_next", "glm_ocr", "glmga", "ernie4_5_vl_moe"], _glm_image),
    "gemma4": _gemma4_image,
}


# Types that cannot be built tiny, or whose text-only forward cannot run, with the error seen (transformers 5.24).
_NEEDS_TIMM = "vision tower is a TimmWrapperModel: ImportError, timm is not installed"
_DRAFTER = ("assistant (draft) model: without its target model the forward raises "
            "'inputs_embeds and shared_kv_states cannot be None'")
UNBUILDABLE: dict[str, str] = {
    "fast_vlm": _NEEDS_TIMM,
    "gemma3n": _NEEDS_TIMM,
    "perception_lm": _NEEDS_TIMM,
    "gemma4_assistant": _DRAFTER,
    "gemma4_unified_assistant": _DRAFTER,
    # Its own save/load round trip loses the language model's weights in transformers 5.24 (the files hold
    # model.language_model.model.*, loading expects model.language_model.*): no reference to compare with.
    "shieldgemma2": "the stock save_pretrained/from_pretrained round trip drops the language model's weights",
    "llama4": "Llama4ForConditionalGeneration.forward reads outputs.image_outputs, which the language model's "
              "MoeCausalLMOutputWithPast lacks (AttributeError); llama4_text covers the decoder",
    # image-conditioned generators: no text-only forward
    "blip": "forward() missing required argument 'pixel_values'",
    "blip-2": "forward() missing required argument 'pixel_values'",
    "instructblip": "forward() missing required arguments 'pixel_values' and 'qformer_input_ids'",
    "instructblipvideo": "forward() missing required arguments 'pixel_values' and 'qformer_input_ids'",
    "idefics": "forward raises 'Exactly 1 of pixel_values, image_encoder_embeddings or perceiver_embeddings'",
    "kosmos-2": "forward raises 'You have to specify either pixel_values or image_embeds'",
    "pix2struct": "forward raises 'You have to specify flattened_patches'",
    "pp_formulanet": "forward raises 'You must specify exactly one of encoder_outputs or pixel_values'",
    "vision-encoder-decoder": "forward raises 'You have to specify pixel_values'",
    "pi0": "robot policy: forward() missing required argument 'state' (and images)",
}
