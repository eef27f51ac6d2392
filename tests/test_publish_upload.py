"""Publishing end to end, offline: `lns-surgery push` against a local fake Hub (tests/fake_hub.py,
127.0.0.1 only). Exactly the checked files arrive with the right bytes and load in a fresh process;
every refusal is one line, exits non-zero, uploads nothing, and never shows the token."""

from __future__ import annotations

import os
import shutil
import socket
import struct
import subprocess
import sys

import pytest
from conftest import STORIES, run_fresh_python, shared_path
from fake_hub import FakeHub

from lns_surgery.core.checkpoint import read_safetensors_header
from lns_surgery.core.errors import LNSError

TOKEN = "hf_TestTokenThatMustNeverBePrinted0123456789"
REPO = "tester/stories260K-lns"
MODEL_FILES = {"config.json", "configuration_lns.py", "modeling_lns.py", "lns_layers.py", "model.safetensors",
               "generation_config.json", "tokenizer.json", "tokenizer_config.json"}
TRAINING_DEBRIS = {"optimizer.pt": b"adam moments", "scheduler.pt": b"cosine", "rng_state.pth": b"rng",
                   "training_args.bin": b"pickled args with " + TOKEN.encode(), "checkpoint-10/model.safetensors": b"old",
                   "checkpoint-10/optimizer.pt": b"old adam", "runs/Jan01/events.out.tfevents.1": b"tensorboard"}


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    import lns_surgery

    root = tmp_path_factory.mktemp("publish-upload")
    lns_surgery.convert(shared_path(STORIES), root / "lns")
    return root / "lns"


@pytest.fixture
def folder(converted, tmp_path):
    """The converted model as a training run leaves it: plus metrics.json and training state."""
    target = tmp_path / "stories-lns"
    shutil.copytree(converted, target)
    (target / "metrics.json").write_text('{"log_history": [{"loss": 2.0, "step": 1}], "eval_loss": 1.9}')
    for name, content in TRAINING_DEBRIS.items():
        (target / name).parent.mkdir(parents=True, exist_ok=True)
        (target / name).write_bytes(content)
    return target


@pytest.fixture
def hub():
    with FakeHub(token=TOKEN) as server:
        yield server


def _closed_port_url() -> str:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}"  # nothing listens there once the probe is closed


def _push(*args, endpoint: str, cwd, env_token: str | None = None, timeout: int = 300):
    """`lns-surgery push ARGS` in a child process, online as far as huggingface_hub knows, with an
    empty HF_HOME (so no stored login leaks in) and the Hub at ``endpoint``."""
    env = {key: value for key, value in os.environ.items()
           if key not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")}
    env.update(HF_ENDPOINT=endpoint, HF_HOME=str(cwd / "hf-home"))
    if env_token:
        env["HF_TOKEN"] = env_token
    return subprocess.run([sys.executable, "-m", "lns_surgery", "push", *args], env=env, cwd=cwd, capture_output=True,
                          text=True, stdin=subprocess.DEVNULL, timeout=timeout)


def _assert_refused(process, expected: str):
    output = process.stdout + process.stderr
    assert process.returncode == 2, output
    errors = [line for line in process.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and expected in errors[0], output
    assert "Traceback" not in output and process.stdout == ""
    assert TOKEN not in output


# --- the real thing -------------------------------------------------------------------------------


def test_push_uploads_exactly_the_checked_files_and_they_load(folder, hub, tmp_path, monkeypatch):
    process = _push(str(folder), "--repo-id", REPO, "--token", TOKEN, "--check-load", endpoint=hub.url, cwd=tmp_path)
    output = process.stdout + process.stderr
    assert process.returncode == 0, output
    assert TOKEN not in output

    received = hub.files(REPO)
    assert set(received) == MODEL_FILES | {"SHA256SUMS", "SOURCE.txt", "llama2c/stories260K.bin", "llama2c/tok512.bin",
                                           "metrics.json", "README.md"}
    for path, content in received.items():
        assert content == (folder / path).read_bytes(), path  # README.md: the card now in the folder too
    assert not any(name in received for name in TRAINING_DEBRIS)
    assert all(TOKEN.encode() not in content for content in received.values())
    assert b"trust_remote_code=True" in received["README.md"] and b"## Training" in received["README.md"]

    repo = hub.repos[REPO]
    assert len(repo.commits) == 1 and repo.commits[0]["summary"] == "Upload stories260K with LayerNorm Scaling (lns-surgery)"
    assert not repo.private and hub.unauthorized == [] and hub.unexpected == []
    assert "validation: ok" in process.stdout and f"commit: {hub.url}/{REPO}/commit/" in process.stdout
    assert "optimizer.pt  (optimizer state)" in process.stdout

    # What a user downloading the repository gets: load it in a fresh process, no lns_surgery, and
    # compare with the folder that was checked.
    download = tmp_path / "downloaded"
    hub.write_received(REPO, download)
    monkeypatch.setenv("HF_MODULES_CACHE", str(tmp_path / "modules"))
    check = run_fresh_python(f"""
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        received = AutoModelForCausalLM.from_pretrained({str(download)!r}, trust_remote_code=True)
        original = AutoModelForCausalLM.from_pretrained({str(folder)!r}, trust_remote_code=True)
        tokenizer = AutoTokenizer.from_pretrained({str(download)!r}, trust_remote_code=True)
        ids = torch.tensor([[1] + tokenizer("Once upon a time")["input_ids"]])
        a, b = received(ids).logits, original(ids).logits
        assert type(received).__name__ == "LNSLlamaForCausalLM" and torch.isfinite(a).all()
        assert torch.equal(a, b)
        print("loaded", type(received).__module__)
    """, cwd=tmp_path)
    assert check.returncode == 0, check.stderr[-2000:]
    assert check.stdout.startswith("loaded transformers_modules.")


def test_dry_run_needs_no_network_no_token_and_writes_nothing(folder, tmp_path):
    before = sorted(path.relative_to(folder).as_posix() for path in folder.rglob("*"))
    process = _push(str(folder), "--repo-id", REPO, "--dry-run", "--check-load", endpoint=_closed_port_url(), cwd=tmp_path)
    assert process.returncode == 0, process.stdout + process.stderr
    out = process.stdout
    assert "validation: ok: LNSLlamaForCausalLM (custom code from the folder)" in out
    assert "README.md: would be created" in out
    assert "files to upload to tester/stories260K-lns (main): 14 files," in out
    assert "1.0 MB  model.safetensors" in out and "  training_args.bin  (pickled training arguments" in out
    assert "----- README.md -----\n---\n" in out and "# stories260K-lns" in out
    assert out.rstrip().endswith("dry run: nothing was uploaded and nothing was written")
    assert sorted(path.relative_to(folder).as_posix() for path in folder.rglob("*")) == before


# --- refusals -------------------------------------------------------------------------------------


def _remove_custom_code(folder):
    (folder / "lns_layers.py").unlink()


def _truncate_weights(folder):
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[:-1000])


def _nan_weights(folder):
    entry = read_safetensors_header(folder / "model.safetensors")["model.layers.4.self_attn.o_proj.weight"]
    with open(folder / "model.safetensors", "r+b") as handle:
        handle.seek(entry.start)
        handle.write(struct.pack("<f", float("inf")) * ((entry.end - entry.start) // 4))


@pytest.mark.parametrize("damage, expected", [
    (_remove_custom_code, "custom-code file 'lns_layers.py' (needed by modeling_lns.py) is missing"),
    (_truncate_weights, "its weights are damaged: 'model.safetensors' is truncated"),
    (_nan_weights, "non-finite logits"),
], ids=["custom-code-file-removed", "truncated-weights", "inf-weights"])
def test_a_broken_checkpoint_is_refused_before_anything_is_uploaded(folder, hub, tmp_path, damage, expected):
    damage(folder)
    process = _push(str(folder), "--repo-id", REPO, "--token", TOKEN, "--check-load", endpoint=hub.url, cwd=tmp_path)
    _assert_refused(process, expected)
    assert hub.repos == {} and hub.commit_count() == 0
    assert not (folder / "README.md").exists()


def test_no_token_is_refused_before_any_request(folder, hub, tmp_path):
    process = _push(str(folder), "--repo-id", REPO, endpoint=hub.url, cwd=tmp_path)
    _assert_refused(process, "no Hugging Face token: pass --token, set HF_TOKEN, or log in")
    assert hub.requests == []


def test_an_unreachable_hub_is_refused_in_one_line(folder, tmp_path):
    endpoint = _closed_port_url()
    process = _push(str(folder), "--repo-id", REPO, endpoint=endpoint, cwd=tmp_path, env_token=TOKEN)
    _assert_refused(process, f"cannot reach the Hub at {endpoint}")


def test_a_rejected_token_is_refused_and_not_shown(folder, hub, tmp_path):
    wrong = TOKEN.replace("Test", "Wrong")
    process = _push(str(folder), "--repo-id", REPO, "--token", wrong, endpoint=hub.url, cwd=tmp_path)
    _assert_refused(process, "the Hub rejected the token (401)")
    assert wrong not in process.stdout + process.stderr
    assert hub.repos == {}


# --- the Python API: branches, pull requests, the --push-to-hub hook ------------------------------


@pytest.fixture
def online(hub, monkeypatch, tmp_path):
    """huggingface_hub in this process, online, talking to the fake Hub only."""
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", hub.url)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-stored-token"))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    return hub


def test_push_to_hub_hook_then_a_pull_request(folder, online, monkeypatch, capsys):
    from lns_surgery.publish import push, push_to_hub

    monkeypatch.setenv("HF_TOKEN", TOKEN)  # the token from the environment, as after `export HF_TOKEN=...`
    first = push_to_hub(folder, REPO, private=True)
    assert online.repos[REPO].private and first.card.action == "created" and first.pr_url is None
    assert "README.md" in online.files(REPO)
    printed = capsys.readouterr()
    assert f"commit: {online.url}/{REPO}/commit/" in printed.out and TOKEN not in printed.out + printed.err

    second = push(folder, REPO, create_pr=True, message="Refresh the card")  # refreshes the card written above
    assert second.card.action == "refreshed"
    assert second.pr_url == f"{online.url}/{REPO}/discussions/1"
    assert online.repos[REPO].commits[-1]["revision"] == "refs/pr/1"
    assert online.repos[REPO].commits[-1]["summary"] == "Refresh the card"
    assert online.files(REPO, "refs/pr/1")["README.md"] == (folder / "README.md").read_bytes()


def test_push_to_a_branch_leaves_main_alone(folder, online, monkeypatch):
    import huggingface_hub.hf_api

    from lns_surgery.publish import push

    # Without hf_xet, upload_folder takes its single-commit route (validate-yaml, preupload, commit): cover it too.
    monkeypatch.setattr(huggingface_hub.hf_api, "is_xet_available", lambda: False)
    result = push(folder, REPO, branch="healed", token=TOKEN)
    assert result.revision == "healed"
    assert set(online.files(REPO, "healed")) == set(result.files.paths())
    assert online.files(REPO, "main") == {}
    assert ("POST", "/api/models/tester/stories260K-lns/branch/healed") in online.requests


def test_read_only_token_and_bad_arguments_are_refused_early(folder, online):
    from lns_surgery.publish import push

    online.role = "read"
    with pytest.raises(LNSError, match="read-only"):
        push(folder, REPO, token=TOKEN)
    with pytest.raises(LNSError, match="cannot be combined with --branch"):
        push(folder, REPO, token=TOKEN, branch="dev", create_pr=True)
    with pytest.raises(LNSError, match="not a Hub repository id"):
        push(folder, "not a/valid/id", token=TOKEN)
    assert online.repos == {}


def test_token_resolution_order_and_scrubbing(tmp_path, monkeypatch):
    import huggingface_hub.constants as constants

    from lns_surgery.publish.upload import _hub_error, resolve_token

    stored = tmp_path / "token"
    stored.write_text("hf_stored")
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(stored))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    assert resolve_token(None) == "hf_stored"
    monkeypatch.setenv("HF_TOKEN", "hf_environment")
    assert resolve_token(None) == "hf_environment"
    assert resolve_token("hf_explicit") == "hf_explicit"
    monkeypatch.delenv("HF_TOKEN")
    stored.unlink()
    with pytest.raises(LNSError, match="no Hugging Face token"):
        resolve_token(None)

    error = _hub_error(RuntimeError(f"server said: bad header 'Bearer {TOKEN}'\nmore"), "uploading", "http://x", TOKEN)
    assert TOKEN not in str(error) and "hf_***" in str(error) and "\n" not in str(error)


def test_a_killed_push_leaves_its_temporary_card_to_the_next_one(tmp_path):
    """SIGKILL between writing the card and renaming it leaves a hidden file in the user's folder; the next
    push removes it, and only it: not one a live push is writing, not a file of the user's."""
    import subprocess
    import sys

    from lns_surgery.publish.upload import _write_card

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        stale = tmp_path / f".README.md.lns-tmp-{dead.pid}"
        running = tmp_path / f".README.md.lns-tmp-{live.pid}"
        users = tmp_path / ".README.md.lns-tmp-notes"
        for path in (stale, running, users):
            path.write_text("half a card")
        _write_card(tmp_path, "the card")
        assert (tmp_path / "README.md").read_text() == "the card"
        assert not stale.exists() and running.exists() and users.exists()
    finally:
        live.kill()
        live.wait()
