"""The depth measures against independent constructions: a model built with a block deleted, and
hidden states captured with output_hidden_states=True."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from lns_reference import EXPECTED_LAYOUT
from tiny_models import NUM_LAYERS, VOCAB, tiny_model
from transformers import AutoModelForCausalLM

import lns_surgery
from lns_surgery.analysis import analyze_model, depth_measures, evaluate_nll, skip_blocks
from lns_surgery.analysis.measures import block_layout
from lns_surgery.conversion.registry import supported_architectures
from lns_surgery.modeling.lns_layers import layer_scale

ARCHITECTURES = [arch.model_type for arch in supported_architectures() if arch.model_type in EXPECTED_LAYOUT]


def _windows(count=5, length=12, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (count, length), generator=generator)


def model_without_block(model, index):
    """An independent (L-1)-block stock model: a fresh model from a config with one layer fewer,
    loaded with the original weights renumbered past the deleted block."""
    config = copy.deepcopy(model.config)
    layers_path = block_layout(model).path
    count = config.num_hidden_layers
    config.num_hidden_layers = count - 1
    for name, value in list(vars(config).items()):  # per-layer settings (layer_types, no_rope_layers, ...)
        if isinstance(value, list) and len(value) == count:
            setattr(config, name, [item for position, item in enumerate(value) if position != index])
    if isinstance(getattr(config, "first_k_dense_replace", None), int) and index < config.first_k_dense_replace:
        config.first_k_dense_replace -= 1
    reference = AutoModelForCausalLM.from_config(config).eval()
    prefix = layers_path + "."
    state = {}
    for key, value in model.state_dict().items():
        if key.startswith(prefix):
            position, rest = key[len(prefix):].split(".", 1)
            if int(position) == index:
                continue
            key = f"{prefix}{int(position) - (int(position) > index)}.{rest}"
        state[key] = value
    reference.load_state_dict(state, strict=True)
    return reference


def _nll(model, windows):
    logits = model(input_ids=windows, use_cache=False).logits[:, :-1]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).double(), windows[:, 1:].reshape(-1), reduction="mean").item()


@pytest.mark.parametrize("model_type", ARCHITECTURES)
def test_skipping_a_block_equals_the_model_built_without_it(model_type):
    model = tiny_model(model_type)
    windows = _windows()
    index = 1
    reference = model_without_block(model, index)
    with torch.inference_mode():
        expected = reference(input_ids=windows, use_cache=False).logits
        with skip_blocks(model, [index]):
            skipped = model(input_ids=windows, use_cache=False).logits
        whole = model(input_ids=windows, use_cache=False).logits
    torch.testing.assert_close(skipped, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(whole, expected, atol=1e-4)  # the block did something, and it is back
    assert all("forward" not in block.__dict__ for block in block_layout(model).blocks)
    # The sweep reuses the recorded input of the block instead of recomputing the blocks before it.
    with torch.inference_mode():
        assert depth_measures(model, windows)["removal_loss"][index] == pytest.approx(_nll(reference, windows), rel=1e-5)


def test_removal_sweep_equals_perplexity_of_each_deleted_model():
    model = tiny_model("llama")
    windows = _windows(count=5, length=16)
    measured = depth_measures(model, windows, batch_size=2)  # 3 batches, the last one short
    with torch.inference_mode():
        assert measured["loss"] == pytest.approx(_nll(model, windows), rel=1e-5)
        for index in range(NUM_LAYERS):
            expected = _nll(model_without_block(model, index), windows)
            assert measured["removal_loss"][index] == pytest.approx(expected, rel=1e-5)
            assert measured["removal_perplexity"][index] == pytest.approx(math.exp(expected), rel=1e-5)
    assert len(set(round(v, 6) for v in measured["removal_loss"])) == NUM_LAYERS  # each pass skipped a different block


def _scaled_reference(stock, index, alpha=1.0):
    """(L-1)-block stock model whose pre-norm outputs are multiplied by the ORIGINAL block's scale."""
    reference = model_without_block(stock, index)
    norms = block_layout(stock).norms
    survivors = [position for position in range(NUM_LAYERS) if position != index]
    for block, original in zip(block_layout(reference).blocks, survivors):
        scale = layer_scale(original, alpha)
        for name in norms:
            block.get_submodule(name).register_forward_hook(lambda module, args, output, scale=scale: output * scale)
    return reference


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_skipping_a_block_of_an_lns_model_keeps_every_other_blocks_scale(model_type):
    stock = tiny_model(model_type)
    lns_model = lns_surgery.apply_layernorm_scaling(copy.deepcopy(stock))
    windows = _windows()
    measured = depth_measures(lns_model, windows, batch_size=3)
    with torch.inference_mode():
        for index in range(NUM_LAYERS):
            reference = _scaled_reference(stock, index)
            with skip_blocks(lns_model, [index]):
                skipped = lns_model(input_ids=windows, use_cache=False).logits
            torch.testing.assert_close(skipped, reference(input_ids=windows, use_cache=False).logits, rtol=1e-5, atol=1e-5)
            assert measured["removal_loss"][index] == pytest.approx(_nll(reference, windows), rel=1e-5)
        # Deleting the block and converting the smaller model renumbers the later blocks: another function.
        renumbered = lns_surgery.apply_layernorm_scaling(model_without_block(stock, 0))
        with skip_blocks(lns_model, [0]):
            skipped = lns_model(input_ids=windows, use_cache=False).logits
        assert not torch.allclose(skipped, renumbered(input_ids=windows, use_cache=False).logits, atol=1e-4)


def _captured_states(model, windows):
    """Block inputs from output_hidden_states=True, plus the last block's output (hidden_states[-1]
    is after the final norm), and each sublayer's output from hooks on the attention and MLP modules."""
    layout = block_layout(model)
    last_output, attention, mlp = [], {}, {}
    handles = [layout.blocks[-1].register_forward_hook(lambda module, args, output: last_output.append(output))]
    for index, block in enumerate(layout.blocks):
        attention_module = getattr(block, "self_attn", None) or getattr(block, "attn")
        handles.append(attention_module.register_forward_hook(
            lambda module, args, output, index=index: attention.__setitem__(index, output[0])))
        handles.append(block.mlp.register_forward_hook(lambda module, args, output, index=index: mlp.__setitem__(index, output)))
    with torch.inference_mode():
        hidden = model(input_ids=windows, output_hidden_states=True, use_cache=False).hidden_states
    for handle in handles:
        handle.remove()
    return [*hidden[: len(layout.blocks)], last_output[0]], attention, mlp


def _angular(a, b):
    cosine = F.cosine_similarity(a.double(), b.double(), dim=-1).clamp(-1, 1)
    return (torch.arccos(cosine) / math.pi).mean().item()


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
@pytest.mark.parametrize("last_token", [False, True])
def test_variance_angular_distance_and_updates_match_captured_hidden_states(model_type, last_token):
    model = tiny_model(model_type)
    windows = _windows(count=5, length=12)
    states, attention, mlp = _captured_states(model, windows)
    entry = analyze_model(model, windows, name="tiny", batch_size=2, last_token=last_token, removal=False)

    assert entry["num_layers"] == NUM_LAYERS
    assert entry["embedding_variance"] == pytest.approx(states[0].var(dim=-1, unbiased=False).mean().item(), rel=1e-5)
    for index, layer in enumerate(entry["layers"]):
        output = states[index + 1]
        assert layer["output_variance"] == pytest.approx(output.var(dim=-1, unbiased=False).mean().item(), rel=1e-5)
        assert layer["residual_norm"] == pytest.approx(output.norm(dim=-1).mean().item(), rel=1e-5)
        assert layer["attention_update_norm"] == pytest.approx(attention[index].norm(dim=-1).mean().item(), rel=1e-4)
        assert layer["mlp_update_norm"] == pytest.approx(mlp[index].norm(dim=-1).mean().item(), rel=1e-4)
        assert layer["removal_perplexity"] is None
    pick = (lambda state: state[:, -1]) if last_token else (lambda state: state)
    for start, row in enumerate(entry["angular_distance"]):
        assert len(row) == NUM_LAYERS - start
        for offset, value in enumerate(row, start=1):
            assert value == pytest.approx(_angular(pick(states[start]), pick(states[start + offset])), abs=2e-6)
        assert entry["layers"][start]["angular_distance_next"] == row[0]
    assert entry["angular_distance_tokens"] == ("last" if last_token else "all")


def test_parallel_residual_blocks_report_no_sublayer_split():
    model = tiny_model("gpt_neox")
    assert model.config.use_parallel_residual
    entry = analyze_model(model, _windows(), batch_size=5, removal=False)
    assert all(layer["attention_update_norm"] is None and layer["mlp_update_norm"] is None for layer in entry["layers"])
    assert all(layer["output_variance"] > 0 for layer in entry["layers"])


def test_analyze_model_leaves_the_model_as_it_was_and_reports_lns_scales():
    model = lns_surgery.apply_layernorm_scaling(tiny_model("llama"), alpha=0.5)
    model.train()
    windows = _windows()
    before = evaluate_nll(model.eval(), windows)
    model.train()
    entry = analyze_model(model, windows, name="half")
    assert model.training
    blocks = block_layout(model).blocks
    assert all("forward" not in block.__dict__ and not block._forward_pre_hooks and not block._forward_hooks for block in blocks)
    assert evaluate_nll(model.eval(), windows) == before
    assert entry["status"] == "lns" and entry["lns_alpha"] == 0.5
    assert [layer["lns_scale"] for layer in entry["layers"]] == pytest.approx([layer_scale(i, 0.5) for i in range(NUM_LAYERS)])
    assert entry["perplexity"] == pytest.approx(math.exp(before[0] / before[1]))


def test_analyze_model_tokenises_text_and_refuses_windows_longer_than_the_model():
    from lns_surgery.core.errors import LNSError

    model = tiny_model("llama")  # max_position_embeddings 64
    with pytest.raises(LNSError, match="longer than"):
        analyze_model(model, _windows(count=2, length=65))


def test_a_peft_wrapped_model_is_analysed_through_its_base_model():
    from peft import LoraConfig, get_peft_model

    model = tiny_model("llama")
    windows = _windows()
    plain = analyze_model(model, windows)
    wrapped = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))  # LoRA B = 0: same function
    entry = analyze_model(wrapped, windows)
    assert entry["perplexity"] == pytest.approx(plain["perplexity"], rel=1e-6)
    assert [layer["removal_perplexity"] for layer in entry["layers"]] == pytest.approx(
        [layer["removal_perplexity"] for layer in plain["layers"]], rel=1e-6)
