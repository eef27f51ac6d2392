"""An image-text checkpoint (LLaVA layout: a CLIP vision tower, a projector, a Llama language model)
converted in code mode: only the language model's blocks are scaled, the processor files are kept,
and a fresh process without lns_surgery loads it with AutoModelForImageTextToText and AutoProcessor
(trust_remote_code=True); its text-only and image+text logits equal the hook reference. Without
trust_remote_code it does not load at all."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import zoo_models
from conftest import run_fresh_python
from test_zoo import hooked_logits

import lns_surgery

LAYERS, NORMS = "model.language_model.layers", ("input_layernorm", "post_attention_layernorm")
WORDS = ["once", "upon", "a", "time", "there", "was", "little", "cat", "dog", "red", "ball", "the"]
PROMPTS = {"text": "once upon a time there was a little cat", "image": "<image> the red ball"}


def _processor(image_token_id: int, image_size: int, patch_size: int):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import CLIPImageProcessor, LlavaProcessor, PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<pad>": 1, **{word: 10 + i for i, word in enumerate(WORDS)}, "<image>": image_token_id}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>")
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    images = CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size})
    return LlavaProcessor(image_processor=images, tokenizer=tokenizer, patch_size=patch_size,
                          vision_feature_select_strategy="default", image_token="<image>", num_additional_image_tokens=1)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("llava")
    stock, _ = zoo_models.build_tiny("llava")
    config = stock.config
    processor = _processor(config.image_token_index, config.vision_config.image_size, config.vision_config.patch_size)
    stock.save_pretrained(root / "stock")
    processor.save_pretrained(root / "stock")
    lns_surgery.convert(root / "stock", root / "lns")
    image = (np.random.default_rng(0).random((40, 48, 3)) * 255).astype("uint8")
    np.save(root / "image.npy", image)
    return root, stock, processor, image


def test_only_the_language_model_is_scaled_and_processor_files_are_kept(converted):
    root, stock, _, _ = converted
    config = json.loads((root / "lns" / "config.json").read_text())
    assert config["lns"]["layers"] == LAYERS and tuple(config["lns"]["norms"]) == NORMS
    assert {"AutoConfig", "AutoModel", "AutoModelForImageTextToText"} <= set(config["auto_map"])
    for name in (root / "stock").iterdir():
        if name.name != "config.json":
            assert (root / "lns" / name.name).read_bytes() == name.read_bytes(), name.name
    report = lns_surgery.inspect_checkpoint(root / "lns")
    assert report["layers"] == LAYERS and report["num_layers"] == stock.config.text_config.num_hidden_layers


def test_fresh_process_loads_with_auto_processor_and_matches_the_reference(converted):
    root, stock, processor, image = converted
    result = run_fresh_python(f"""
        import numpy as np, torch
        from transformers import AutoModelForImageTextToText, AutoProcessor
        folder = {str(root / 'lns')!r}
        processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
        model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32).eval()
        assert type(model).__name__ == "LNSLlavaForConditionalGeneration", type(model).__name__
        assert all(".language_model." in n for n, m in model.named_modules() if hasattr(m, "lns_scale")), "vision scaled"
        image = np.load({str(root / 'image.npy')!r})
        with torch.no_grad():
            text = model(**processor(text={PROMPTS['text']!r}, return_tensors="pt")).logits
            both = model(**processor(text={PROMPTS['image']!r}, images=image, return_tensors="pt")).logits
        torch.save({{"text": text, "image": both}}, {str(root / 'logits.pt')!r})
    """)
    assert result.returncode == 0, result.stderr[-3000:]
    logits = torch.load(root / "logits.pt")
    for name, inputs in (("text", processor(text=PROMPTS["text"], return_tensors="pt")),
                         ("image", processor(text=PROMPTS["image"], images=image, return_tensors="pt"))):
        reference = hooked_logits(stock, LAYERS, NORMS, dict(inputs))
        with torch.no_grad():
            base = stock(**inputs).logits
        assert (reference - base).abs().max() > 1e-4, "the scaling must be active"
        assert (logits[name] - reference).abs().max() <= 1e-5, name


def test_without_trust_remote_code_it_does_not_load(converted):
    root = converted[0]
    result = run_fresh_python(f"""
        from transformers import AutoModelForImageTextToText
        AutoModelForImageTextToText.from_pretrained({str(root / 'lns')!r})
    """)
    assert result.returncode != 0 and "trust_remote_code" in result.stderr
