"""The scale must survive everything that rebuilds, copies or wraps a model.

A public implementation lost it on meta-device initialisation (it lived in a buffer that
``to_empty`` wiped); these tests run each of those paths and compare with the reference.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from lns_reference import hooked_reference
from tiny_models import VOCAB, tiny_model

import lns_surgery
from conftest import run_fresh_python, shared_path
from lns_surgery.modeling.auto import register

KINDS = ["llama", "gemma2", "gpt2", "olmo"]  # one per norm kind
TOLERANCE = 1e-5


def _ids():
    return torch.randint(3, VOCAB, (2, 10), generator=torch.Generator().manual_seed(2))


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _pair(model_type, alpha=1.0):
    """(stock model, LNS copy, reference logits, stock logits)."""
    stock = tiny_model(model_type)
    ids = _ids()
    with hooked_reference(stock, model_type, alpha=alpha):
        reference = _logits(stock, ids)
    lns = lns_surgery.apply_layernorm_scaling(copy.deepcopy(stock), alpha=alpha)
    return stock, lns, reference, _logits(stock, ids)


def _close(a, b, tol=TOLERANCE):
    return (a - b).abs().max().item() <= tol


@pytest.mark.parametrize("model_type", KINDS)
def test_meta_device_init_then_load_state_dict(model_type):
    stock, lns, reference, _ = _pair(model_type)
    classes = register(lns.config.lns)
    with torch.device("meta"):
        rebuilt = classes["AutoModelForCausalLM"](copy.deepcopy(lns.config))
    rebuilt = rebuilt.to_empty(device="cpu")  # what wiped the scale in a public implementation
    rebuilt.load_state_dict(stock.state_dict(), strict=False)
    rebuilt.tie_weights()
    with torch.no_grad():  # non-persistent buffers (rotary inv_freq) are not in the state dict
        for name, buffer in stock.named_buffers():
            rebuilt.get_buffer(name).copy_(buffer)
    assert _close(_logits(rebuilt.eval(), _ids()), reference)


@pytest.mark.parametrize("model_type", KINDS)
def test_from_pretrained_with_device_map_dtype_and_deepcopy(model_type, tmp_path):
    _, lns, reference, _ = _pair(model_type)
    lns.save_pretrained(tmp_path)
    loaded = lns_surgery.load_model(tmp_path, device_map="cpu").eval()
    assert _close(_logits(loaded, _ids()), reference)
    assert _close(_logits(copy.deepcopy(loaded), _ids()), reference)
    # Changing dtype keeps the scales: compare in bf16 with a bf16 reference.
    half = copy.deepcopy(loaded).to(torch.bfloat16)
    norms = [m for m in half.modules() if hasattr(m, "lns_scale")]
    assert norms and {round(m.lns_scale, 6) for m in norms} == {round(1 / (i + 1) ** 0.5, 6) for i in range(4)}
    stock_half = tiny_model(model_type).to(torch.bfloat16)
    with hooked_reference(stock_half, model_type):
        reference_half = _logits(stock_half, _ids())
    assert (_logits(half, _ids()).float() - reference_half.float()).abs().max() < 0.1


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_torch_compile(model_type):
    _, lns, reference, _ = _pair(model_type)
    compiled = torch.compile(lns, backend="aot_eager")  # dynamo + AOT autograd, no C++ toolchain needed
    assert _close(_logits(compiled, _ids()), reference)


@pytest.mark.parametrize("model_type", KINDS)
def test_same_gradients_as_scaling_the_output_with_gradient_checkpointing(model_type):
    stock, lns, _, _ = _pair(model_type)
    ids = _ids()
    for module in [*stock.modules(), *lns.modules()]:  # train mode, but deterministic
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    with hooked_reference(stock.train(), model_type):
        stock(input_ids=ids, labels=ids).loss.backward()
    lns.train()
    lns.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    lns.config.use_cache = False
    lns(input_ids=ids, labels=ids).loss.backward()
    reference_grads = {name: p.grad for name, p in stock.named_parameters() if p.grad is not None}
    grads = {name: p.grad for name, p in lns.named_parameters() if p.grad is not None}
    assert reference_grads.keys() == grads.keys()
    for name, grad in grads.items():
        assert torch.allclose(grad, reference_grads[name], atol=1e-5, rtol=1e-4), name


@pytest.mark.parametrize("model_type", ["llama", "gemma2", "gpt2"])
def test_peft_lora_and_norms_in_modules_to_save(model_type):
    from peft import LoraConfig, get_peft_model

    stock, lns, reference, stock_logits = _pair(model_type)
    norm_name = {"gpt2": "ln_1", "gemma2": "input_layernorm", "llama": "input_layernorm"}[model_type]
    peft_model = get_peft_model(lns, LoraConfig(r=4, target_modules="all-linear", modules_to_save=[norm_name]))
    assert _close(_logits(peft_model, _ids()), reference)
    wrapped = [m for name, m in peft_model.named_modules() if name.endswith(norm_name) and hasattr(m, "modules_to_save")]
    assert wrapped, "the norms should be wrapped by PEFT"
    assert all(m.modules_to_save["default"].lns_scale == m.original_module.lns_scale for m in wrapped)
    # Turning the scaling off through the wrapper reaches the copies too.
    lns_surgery.set_lns_alpha(peft_model, 0.0)
    assert _close(_logits(peft_model, _ids()), stock_logits)
    lns_surgery.set_lns_alpha(peft_model, 1.0)
    merged = peft_model.merge_and_unload()
    assert lns_surgery.is_lns_model(merged)
    assert _close(_logits(merged, _ids()), reference)


@pytest.mark.parametrize("model_type", ["llama", "gemma2"])
def test_alpha_interpolates_from_the_original_function(model_type):
    stock, lns, reference, stock_logits = _pair(model_type)
    lns_surgery.set_lns_alpha(lns, 0.0)
    assert _close(_logits(lns, _ids()), stock_logits)
    lns_surgery.set_lns_alpha(lns, 0.5)
    with hooked_reference(stock, model_type, alpha=0.5):
        half_reference = _logits(stock, _ids())
    assert _close(_logits(lns, _ids()), half_reference)
    assert lns.config.lns["alpha"] == 0.5
    lns_surgery.set_lns_alpha(lns, 1.0)
    assert _close(_logits(lns, _ids()), reference)


def test_from_scratch_init_matches_stock_init():
    """Building an LNS model from a config initialises its weights exactly like the stock class."""
    from transformers import Gemma2ForCausalLM

    stock = tiny_model("gemma2")
    lns = lns_surgery.apply_layernorm_scaling(copy.deepcopy(stock))
    classes = register(lns.config.lns)
    torch.manual_seed(5)
    fresh_lns = classes["AutoModelForCausalLM"](copy.deepcopy(lns.config))
    torch.manual_seed(5)
    fresh_stock = Gemma2ForCausalLM(stock.config)
    for (name, a), (_, b) in zip(fresh_lns.state_dict().items(), fresh_stock.state_dict().items()):
        assert torch.equal(a, b), name
    assert fresh_lns.model.layers[3].input_layernorm.lns_scale == pytest.approx(0.5)


@pytest.mark.parametrize("model_type", ["llama", "gemma2", "gpt2"])  # the three weight forms
def test_symbolic_trace_shows_the_scale_after_the_stock_norm(model_type):
    """A runtime that swaps norms it recognises in a torch.fx trace for its own kernel (vLLM's
    Transformers backend does, feeding the kernel the stored weight) must see the scale as compute
    after the norm, never folded into the weight operand where such a swap silently drops it."""
    import operator

    stock, lns, _, _ = _pair(model_type)
    block = 3  # scale 1/2
    norm_name = "ln_1" if model_type == "gpt2" else "input_layernorm"
    layers = lns.transformer.h if model_type == "gpt2" else lns.model.layers
    stock_layers = stock.transformer.h if model_type == "gpt2" else stock.model.layers
    norm, stock_norm = getattr(layers[block], norm_name), getattr(stock_layers[block], norm_name)
    assert norm.lns_scale == pytest.approx(0.5)

    traced = torch.fx.symbolic_trace(norm)
    (returned,) = [node.args[0] for node in traced.graph.nodes if node.op == "output"]
    assert returned.op == "call_function" and returned.target is operator.mul
    assert returned.args[1] == norm.lns_scale  # the last compute multiplies the stock norm's output

    x = torch.randn(2, 7, stock.config.hidden_size, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = 0.5 * stock_norm(x)
        assert _close(traced(x), expected, 1e-6)
        assert _close(norm(x), expected, 1e-6)  # eager runs the effective-weight form: same function


# --- hub kernels: transformers' use_kernels (on by default when `kernels` is installed) and kernelize ---
# They replace the forward of every module whose class has a ``kernel_layer_name`` by a kernel for that
# name; the stock RMSNorms carry "RMSNorm" (kernels-community's Liger RMSNorm on CUDA). The Hub is out
# of reach in tests, so an RMSNorm kernel is served on CPU from memory.


class _HubRMSNorm(torch.nn.Module):
    """Stands in for a Hub RMSNorm kernel: stateless, the stock math on the module's stored weight."""

    def forward(self, hidden_states):
        x = hidden_states.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * x.to(hidden_states.dtype)


class _InMemoryKernelRepository:
    """A kernels repository (``load()`` gives the layer class) that needs no Hub."""

    layer_name = "_HubRMSNorm"

    def load(self):
        return _HubRMSNorm


def _cpu_rmsnorm_kernel():
    kernels = pytest.importorskip("kernels")  # transformers' use_kernels needs it too
    return kernels.use_kernel_mapping({"RMSNorm": {"cpu": _InMemoryKernelRepository()}})


def _kernelized(model) -> dict:
    """module name -> whether kernelize gave it a kernel's forward, for the model's norms."""
    return {name: "_kernel_repo" in vars(module) for name, module in model.named_modules() if name.endswith("norm")}


@pytest.mark.parametrize("model_type", KINDS)
def test_scaled_norm_classes_are_not_kernelize_candidates(model_type):
    _, lns, _, _ = _pair(model_type)
    scaled = [m for m in lns.modules() if hasattr(type(m), "lns_kind")]
    assert scaled and not any(hasattr(type(m), "kernel_layer_name") or hasattr(m, "kernel_layer_name") for m in scaled)


def test_hub_kernels_leave_the_scaled_norms_alone():
    stock, lns, reference, stock_logits = _pair("llama")
    with _cpu_rmsnorm_kernel():
        stock.set_use_kernels(True)  # what from_pretrained does after loading
        lns.set_use_kernels(True)
        kernelized_stock, kernelized_lns = _kernelized(stock), _kernelized(lns)
        assert all(kernelized_stock.values())  # the kernel replaces every stock RMSNorm
        assert _close(_logits(stock, _ids()), stock_logits)  # and computes the stock norm
        assert [name for name, done in kernelized_lns.items() if done] == ["model.norm"]  # the unscaled final norm
        assert _close(_logits(lns, _ids()), reference)
        lns.train()  # a new mode kernelizes again
        lns.eval()
        assert _close(_logits(lns, _ids()), reference)


def test_scaling_a_kernelized_model_drops_the_kernel_from_the_scaled_norms():
    """lns_convert scales a stock model after from_pretrained may have kernelized it."""
    stock = tiny_model("llama")
    ids = _ids()
    with hooked_reference(stock, "llama"):
        reference = _logits(stock, ids)
    with _cpu_rmsnorm_kernel():
        stock.set_use_kernels(True)
        assert all(_kernelized(stock).values())
        lns = lns_surgery.apply_layernorm_scaling(stock)
        assert [name for name, done in _kernelized(lns).items() if done] == ["model.norm"]
        assert _close(_logits(lns, ids), reference)
        lns.train()
        lns.eval()
        assert _close(_logits(lns, ids), reference)


def test_use_kernels_on_load_keeps_the_scaling(tmp_path):
    _, lns, reference, stock_logits = _pair("llama")
    lns.save_pretrained(tmp_path)
    with _cpu_rmsnorm_kernel():
        for kwargs in ({}, {"use_kernels": True}):  # the default is on when kernels is installed
            loaded = lns_surgery.load_model(tmp_path, **kwargs).eval()
            assert loaded.use_kernels and _kernelized(loaded)["model.norm"], kwargs
            assert _close(_logits(loaded, _ids()), reference), kwargs
            assert not _close(_logits(loaded, _ids()), stock_logits, 1e-2)


def test_use_kernels_on_load_keeps_the_scaling_with_the_shipped_code(tmp_path):
    """The same in a process without lns_surgery: transformers loads the checkpoint's own code."""
    _, lns, reference, stock_logits = _pair("llama")
    lns.save_pretrained(tmp_path)
    torch.save(_ids(), tmp_path / "ids.pt")
    result = run_fresh_python(f"""
        import json, torch
        from kernels import use_kernel_mapping
        from transformers import AutoModelForCausalLM

        class HubRMSNorm(torch.nn.Module):
            def forward(self, hidden_states):
                x = hidden_states.float()
                x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
                return self.weight * x.to(hidden_states.dtype)

        class Repository:
            layer_name = "HubRMSNorm"
            def load(self):
                return HubRMSNorm

        with use_kernel_mapping({{"RMSNorm": {{"cpu": Repository()}}}}):
            model = AutoModelForCausalLM.from_pretrained({str(tmp_path)!r}, trust_remote_code=True).eval()
            with torch.no_grad():
                logits = model(input_ids=torch.load({str(tmp_path / "ids.pt")!r})).logits
        kernelized = sorted(n for n, m in model.named_modules() if "_kernel_repo" in vars(m))
        print(json.dumps({{"module": type(model).__module__, "kernelized": kernelized, "logits": logits.tolist()}}))
    """)
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["module"].startswith("transformers_modules.")  # the checkpoint's code, not lns_surgery's
    assert out["kernelized"] == ["model.norm"]
    logits = torch.tensor(out["logits"])
    assert _close(logits, reference) and not _close(logits, stock_logits, 1e-2)


def test_use_kernels_in_a_recipe_keeps_the_scaling(stories_path, tmp_path):
    """``model_init_kwargs: {use_kernels: true}`` (TRL's replacement for Liger) through the training path,
    from a converted checkpoint and with lns_convert."""
    from lns_surgery.training.recipe import recipe_from_dict
    from lns_surgery.training.run import build_trainer

    ids = torch.tensor([[1, 403, 407, 261, 378, 430, 426, 271, 259, 417]])
    stock = lns_surgery.load_model(stories_path).eval()
    stock_logits = _logits(stock, ids)
    with hooked_reference(stock, "llama"):
        reference = _logits(stock, ids)
    converted = lns_surgery.convert(stories_path, tmp_path / "lns")
    base = {"dataset_name": str(shared_path("data/alpaca/alpaca_first100.json")), "max_length": 64, "use_peft": False,
            "model_init_kwargs": {"use_kernels": True}, "activation_checkpointing": False, "use_cpu": True,
            "report_to": "none", "disable_tqdm": True, "seed": 0}
    runs = {"checkpoint": {"model_name_or_path": str(converted)},
            "lns_convert": {"model_name_or_path": str(stories_path), "lns_convert": True}}
    with _cpu_rmsnorm_kernel():
        for name, settings in runs.items():
            recipe = recipe_from_dict({**base, **settings, "output_dir": str(tmp_path / name)}, "sft")
            trainer, _ = build_trainer(recipe)
            model = trainer.model.eval()
            assert [n for n, done in _kernelized(model).items() if done] == ["model.norm"], name
            logits = _logits(model, ids)
            assert _close(logits, reference), name
            assert not _close(logits, stock_logits, 1e-2), name


def test_use_liger_kernel_on_an_lns_model_is_one_line(stories_path, tmp_path):
    from lns_surgery.core.errors import LNSError
    from lns_surgery.training.recipe import recipe_from_dict
    from lns_surgery.training.run import build_trainer

    settings = {"model_name_or_path": str(stories_path), "lns_convert": True, "use_liger_kernel": True,
                "dataset_name": str(shared_path("data/alpaca/alpaca_first100.json")), "max_length": 64,
                "output_dir": str(tmp_path / "out"), "use_cpu": True, "report_to": "none"}
    with pytest.raises(LNSError, match=r"use_liger_kernel: .*model_init_kwargs: \{use_kernels: true\}"):
        build_trainer(recipe_from_dict(settings, "sft"))
