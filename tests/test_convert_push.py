"""`convert --push-to-hub` publishes the converted folder through the same checks as `push`."""

from __future__ import annotations

import os
import subprocess
import sys

from conftest import STORIES, shared_path
from fake_hub import FakeHub

TOKEN = "hf_ConvertPushTokenNeverPrinted0123456789"


def test_convert_then_push(tmp_path):
    source = shared_path(STORIES)
    env = {key: value for key, value in os.environ.items()
           if key not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")}
    with FakeHub(token=TOKEN) as hub:
        env.update(HF_ENDPOINT=hub.url, HF_HOME=str(tmp_path / "hf-home"), HF_TOKEN=TOKEN)
        result = subprocess.run(
            [sys.executable, "-m", "lns_surgery", "convert", str(source), "--out", str(tmp_path / "lns"),
             "--push-to-hub", "tester/stories-lns"],
            env=env, cwd=tmp_path, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=600,
        )
        assert result.returncode == 0, result.stderr
        received = hub.files("tester/stories-lns")
    assert TOKEN not in result.stdout + result.stderr
    assert {"config.json", "modeling_lns.py", "lns_layers.py", "configuration_lns.py", "model.safetensors", "README.md"} <= set(received)
    assert received["config.json"] == (tmp_path / "lns" / "config.json").read_bytes()
    assert b"layernorm-scaling" in received["README.md"]


def test_sft_then_push(tmp_path):
    """`sft --push-to-hub` publishes the finished run (merged model, card with its metrics)."""
    from conftest import REPO_ROOT

    shared_path(STORIES)
    env = {key: value for key, value in os.environ.items()
           if key not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")}
    with FakeHub(token=TOKEN) as hub:
        env.update(HF_ENDPOINT=hub.url, HF_HOME=str(tmp_path / "hf-home"), HF_TOKEN=TOKEN)
        result = subprocess.run(
            [sys.executable, "-m", "lns_surgery", "sft", "--recipe", "recipes/cpu/sft-alpaca-tiny.yaml",
             "--max_steps", "2", "--output_dir", str(tmp_path / "run"), "--push-to-hub", "tester/sft-lns"],
            env=env, cwd=REPO_ROOT, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=900,
        )
        assert result.returncode == 0, result.stderr[-3000:]
        received = hub.files("tester/sft-lns")
    assert {"config.json", "modeling_lns.py", "model.safetensors", "metrics.json", "README.md"} <= set(received)
    assert b"## Training" in received["README.md"]
    assert not any(name.startswith(("checkpoints/", "adapter/optimizer")) for name in received)
