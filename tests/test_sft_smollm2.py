"""Chat SFT of the real 30-block SmolLM2-135M-Instruct with ``recipes/cpu/sft-smollm2-dolly.yaml``: its own
chat template (with generation tags), loss on the assistant replies only, LoRA merged into a standalone LNS
checkpoint that a fresh process loads with plain transformers."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
import yaml
from transformers import TrainerCallback

from conftest import REPO_ROOT, run_fresh_python, shared_path

RECIPE = REPO_ROOT / "recipes" / "cpu" / "sft-smollm2-dolly.yaml"
TEMPLATE = REPO_ROOT / "recipes" / "cpu" / "smollm2-chat.jinja"
DOLLY = "data/dolly-chat/dolly_2k_chat.jsonl"

pytestmark = pytest.mark.slow


def _prepare_module():
    spec = importlib.util.spec_from_file_location("prepare_smollm2", REPO_ROOT / "scripts" / "prepare_smollm2.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    gguf_folder = shared_path("models/smollm2-135m-instruct-gguf")
    module = _prepare_module()
    return module.prepare_smollm2(tmp_path_factory.mktemp("smollm2") / "model",
                                  gguf_folder / module.SMOLLM2_GGUF.name, quiet=True)


class LoRASnapshot(TrainerCallback):
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    def on_train_end(self, args, state, control, model=None, **kwargs):
        params = dict(model.named_parameters())
        self.moved = [n for n, before in self.before.items() if not torch.equal(params[n].detach(), before)]


def test_recipe_template_renders_what_smollm2_own_template_renders(smollm2):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    own, ours = tokenizer.chat_template, TEMPLATE.read_text()
    assert "endgeneration" not in own and "endgeneration" in ours
    conversations = [json.loads(line)["messages"] for line in shared_path(DOLLY).read_text().splitlines()[:40]]
    conversations.append([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
                          {"role": "user", "content": "Bye"}])  # no system turn: SmolLM2 adds its own
    for messages in conversations:
        for prompt in (False, True):
            assert tokenizer.apply_chat_template(messages, tokenize=False, chat_template=ours, add_generation_prompt=prompt) \
                == tokenizer.apply_chat_template(messages, tokenize=False, chat_template=own, add_generation_prompt=prompt)


def test_recipe_trains_assistant_turns_and_exports_a_merged_lns_model(smollm2, tmp_path):
    from lns_surgery.training.recipe import recipe_from_dict
    from lns_surgery.training.run import train_from_dict

    settings = yaml.safe_load(RECIPE.read_text())
    recipe_from_dict(settings, "sft")  # the recipe as shipped is valid
    assert settings["chat_template"] == "recipes/cpu/smollm2-chat.jinja" and settings["assistant_only_loss"]
    assert settings["lns_convert"] and settings["use_peft"] and settings["export"] == "merged"
    # the same recipe, made small: two steps on 32 conversations, without warm-up (LoRA's B starts at 0, so A
    # gets its first gradient in step 2; a warm-up step at learning rate 0 would leave A untrained)
    settings.update(model_name_or_path=str(smollm2), dataset_name=str(shared_path(DOLLY)), chat_template=str(TEMPLATE),
                    output_dir=str(tmp_path / "out"), max_train_samples=32, eval_fraction=0.0, eval_strategy="no",
                    max_length=256, per_device_train_batch_size=4, max_steps=2, warmup_steps=0, logging_steps=1,
                    disable_tqdm=True, report_to="none")
    snapshot = LoRASnapshot()
    result = train_from_dict(settings, "sft", callbacks=[snapshot])
    out = result.output_dir
    assert snapshot.before and len(snapshot.moved) == len(snapshot.before)  # every LoRA matrix trained

    # loss only on the assistant replies: each masked span is a reply ending in <|im_end|>, never a prompt
    tokenizer = result.tokenizer
    rows = result.trainer.train_dataset  # TRL folds the template's assistant mask into labels (-100 elsewhere)
    for row in rows.select(range(4)):
        ids, mask = row["input_ids"], [int(label != -100) for label in row["labels"]]
        assert all(label in (token, -100) for token, label in zip(ids, row["labels"]))
        assert 0 < sum(mask) < len(ids)
        spans, start = [], None
        for position, keep in enumerate([*mask, 0]):
            if keep and start is None:
                start = position
            elif not keep and start is not None:
                spans.append((start, position))
                start = None
        for start, stop in spans:
            reply = tokenizer.decode(ids[start:stop])
            assert "<|im_start|>" not in reply
            assert reply.endswith("<|im_end|>") or stop == len(ids)  # or cut by max_length
            assert tokenizer.decode(ids[:start]).endswith("<|im_start|>assistant\n")

    # a merged, standalone LNS checkpoint with the recipe's template
    assert not (out / "adapter").exists()
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "lns_llama" and config["lns"]["alpha"] == 1.0 and config["num_hidden_layers"] == 30
    assert (out / "chat_template.jinja").read_text().strip() == TEMPLATE.read_text().strip()

    prompt = list(tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                                add_generation_prompt=True, return_dict=True)["input_ids"])
    fresh = run_fresh_python(f"""
        import json, torch
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True).eval()
        with torch.no_grad():
            logits = model(torch.tensor([{prompt!r}])).logits[0]
        print(json.dumps({{"class": type(model).__name__, "logits": logits.tolist()}}))
    """)
    assert fresh.returncode == 0, fresh.stderr[-3000:]
    loaded = json.loads(fresh.stdout.strip().splitlines()[-1])
    assert loaded["class"] == "LNSLlamaForCausalLM"
    model = result.model.eval()
    with torch.no_grad():
        expected = model(torch.tensor([prompt])).logits[0]
    torch.testing.assert_close(torch.tensor(loaded["logits"]), expected, atol=1e-4, rtol=1e-4)
