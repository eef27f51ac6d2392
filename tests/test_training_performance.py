"""The attention path of packed runs, and the throughput figures every run records."""

from __future__ import annotations

import types

import pytest

from lns_surgery.training.performance import ThroughputCallback, gpu_peak_tflops, packing_attention


def _training(packing=False, strategy="bfd", padding_free=False):
    return types.SimpleNamespace(packing=packing, packing_strategy=strategy, padding_free=padding_free)


def _model(attn=None):
    return types.SimpleNamespace(attn_implementation=attn)


@pytest.mark.parametrize("training, model, cuda, flash, expected", [
    # packed padding-free batches on a GPU: a path that needs no dense (T x T) mask
    (_training(packing=True), _model(), True, False, "flex_attention"),
    (_training(packing=True), _model(), True, True, "flash_attention_2"),
    (_training(padding_free=True), _model(), True, False, "flex_attention"),
    # flex attention has no backward on CPU: keep the model's own (sdpa)
    (_training(packing=True), _model(), False, False, None),
    # the recipe's own choice wins; padded or wrapped batches have no per-document mask to build
    (_training(packing=True), _model("eager"), True, True, None),
    (_training(packing=True, strategy="wrapped"), _model(), True, True, None),
    (_training(), _model(), True, True, None),
])
def test_packing_attention(training, model, cuda, flash, expected):
    assert packing_attention(training, model, cuda, flash) == expected


def test_gpu_peaks_are_known_by_name_or_not_guessed():
    assert gpu_peak_tflops("NVIDIA H200") == 989.0 and gpu_peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert gpu_peak_tflops("Some Future GPU") is None and gpu_peak_tflops(None) is None


def test_steady_state_leaves_out_the_first_step_and_what_happens_between_steps(monkeypatch):
    import torch

    from lns_surgery.training import performance

    clock = types.SimpleNamespace(now=0.0)
    monkeypatch.setattr(performance.time, "perf_counter", lambda: clock.now)
    timer = ThroughputCallback()
    timer._torch = torch
    state = types.SimpleNamespace(num_input_tokens_seen=0)
    for step_seconds, tokens in ((5.0, 100), (1.0, 100), (1.0, 300)):
        timer.on_step_begin(None, state, None)
        clock.now += step_seconds
        state.num_input_tokens_seen += tokens
        timer.on_step_end(None, state, None)
        clock.now += 50.0  # evaluation or a checkpoint save between steps: not counted
    summary = timer.summary()
    assert summary["steady_steps"] == 2 and summary["steady_tokens_per_second"] == 200.0  # 400 tokens in 2 s
    assert summary["mfu"] is None and summary["peak_host_memory_gb"] > 0


def test_model_flops_count_the_non_embedding_weights_and_mfu_divides_by_every_gpus_peak():
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, tie_word_embeddings=False))
    dense = model.num_parameters(exclude_embeddings=True)
    args = types.SimpleNamespace(bf16=False, fp16=False, world_size=1)
    full = ThroughputCallback(lora=False)
    full.on_train_begin(args, None, None, model=model)
    assert full.flops_per_token == 6 * dense
    lora = ThroughputCallback(lora=True)
    lora.on_train_begin(args, None, None, model=get_peft_model(model, LoraConfig(r=4, target_modules="all-linear")))
    assert lora.flops_per_token == 4 * dense  # frozen weights: forward and input gradients only

    full.step_seconds, full.step_tokens = [9.0, 1.0, 1.0], [10, 1000, 1000]
    full.peak_tflops, full.processes = 1e-6, 2  # a made-up 1 MFLOP/s GPU, two of them
    assert full.summary()["mfu"] == pytest.approx(1000 * 6 * dense / (1e-6 * 1e12 * 2))
    assert torch.cuda.is_available() or full.summary()["peak_gpu_memory_gb"] is None
