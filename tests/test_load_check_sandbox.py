"""`push --check-load` runs a stranger's code. In the load check's sandbox that code reaches none of the
user's secrets, files, processes or network, cannot change the folder, cannot outlive the check (its
end, its time limit, or a killed push), and cannot pass the check by printing or forging a result.
The same planted code run without the sandbox reaches all of it: the probes are real."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
from conftest import STORIES, invoke_cli, shared_path

from lns_surgery.core.errors import LNSError
from lns_surgery.publish.validate import load_check

SECRETS = {"HF_TOKEN": "hf_SandboxProbeSecret0123456789", "AWS_SECRET_ACCESS_KEY": "aws-probe-secret",
           "GITHUB_TOKEN": "ghp_probe_secret"}
REPO_ID = "tester/sandboxed"


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    import lns_surgery

    root = tmp_path_factory.mktemp("sandbox")
    return lns_surgery.convert(shared_path(STORIES), root / "lns")


@pytest.fixture
def folder(converted, tmp_path):
    target = tmp_path / "model"
    shutil.copytree(converted, target)
    return target


def _plant(folder: Path, code: str) -> None:
    """``code`` runs when transformers imports the folder's modeling file, as the folder's author wants."""
    modeling = folder / "modeling_lns.py"
    modeling.write_text(code + "\n" + modeling.read_text())


def _processes_with(text: str) -> list[int]:
    """Processes of this machine whose command line contains ``text``."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        if text.encode() in cmdline:
            found.append(int(entry))
    return found


class _Watch:
    """Notes, from outside, whether a process whose command line holds ``mark`` ever ran: proof that the
    planted daemon was there to be stopped."""

    def __init__(self, mark: str):
        self.mark, self.seen, self._stop = mark, threading.Event(), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            if _processes_with(self.mark):
                self.seen.set()
            time.sleep(0.1)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def _wait_until(condition, limit: float, what: str) -> None:
    """Wait for an event that happens asynchronously (a process appearing or being reaped); the limit
    only bounds a failing test."""
    deadline = time.monotonic() + limit
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"{what} did not happen within {limit:.0f} s")
        time.sleep(0.2)


# --- what the folder's code can reach --------------------------------------------------------------

PROBE = r'''
import json as _json, os as _os, socket as _socket, sys as _sys
_found = {}
def _probe(name, action):
    try:
        action()
        _found[name] = "reached"
    except BaseException as exc:
        _found[name] = "blocked: " + type(exc).__name__
def _unix(path):
    client = _socket.socket(_socket.AF_UNIX)
    client.settimeout(5)
    client.connect(path)
    client.close()
def _others():
    pids = [int(p) for p in _os.listdir("/proc") if p.isdigit() and int(p) not in (1, _os.getpid())]
    if not pids:
        raise LookupError("only the namespace's init and this process")
def _read_home():  # anything there besides the way to the Python environment
    import pwd
    home = pwd.getpwuid(_os.getuid()).pw_dir
    needed = [_sys.prefix, _sys.base_prefix, _sys.executable, *_sys.path]
    if not [name for name in _os.listdir(home)
            if not any(path.startswith(_os.path.join(home, name) + "/") for path in needed)]:
        raise LookupError("only the way to the Python environment")
def _write_system():
    import json
    open(_os.path.join(_os.path.dirname(json.__file__), "lns-probe"), "w").close()
def _umount():
    import ctypes
    if ctypes.CDLL(None, use_errno=True).umount2(_sys.argv[2].encode(), 2) != 0:
        raise PermissionError(_os.strerror(ctypes.get_errno()))
_probe("parent environ", lambda: open(f"/proc/{PARENT}/environ", "rb").read())
_probe("parent cmdline", lambda: open(f"/proc/{PARENT}/cmdline", "rb").read())
_probe("init environ", lambda: open(f"/proc/{_os.getppid()}/environ", "rb").read())
_probe("other processes", _others)
_probe("stored token", lambda: open(TOKEN_FILE).read())
_probe("real home", _read_home)
_probe("secret in environment", lambda: [_os.environ[k] for k in SECRET_NAMES if k in _os.environ][0])
_probe("tcp 127.0.0.1", lambda: _socket.create_connection(("127.0.0.1", PORT), timeout=5).close())
_probe("ssh agent socket", lambda: _unix(AGENT))
_probe("folder on disk", lambda: open(FOLDER + "/config.json", "a").close())
_probe("loaded folder", lambda: open(_sys.argv[2] + "/config.json", "a").close())
_probe("new file in loaded folder", lambda: open(_sys.argv[2] + "/planted.txt", "w").close())
if SANDBOXED:  # without the sandbox these would change the real machine
    _probe("system folder", _write_system)
    _probe("undo a mount", _umount)
raise RuntimeError("PROBE " + _json.dumps(_found, separators=(",", ":")))
'''


@pytest.fixture
def bait(tmp_path, monkeypatch):
    """What a user's session holds: secrets in the environment, a stored Hub token, a local service,
    an SSH agent."""
    home = tmp_path / "home"
    (home / ".cache" / "huggingface").mkdir(parents=True)
    (home / ".cache" / "huggingface" / "token").write_text(SECRETS["HF_TOKEN"])
    monkeypatch.setenv("HOME", str(home))
    for key, value in SECRETS.items():
        monkeypatch.setenv(key, value)
    service = socket.socket()
    service.bind(("127.0.0.1", 0))
    service.listen(8)
    agent_folder = tempfile.mkdtemp(prefix="lns-agent-")  # a socket path must be short
    agent = socket.socket(socket.AF_UNIX)
    agent.bind(f"{agent_folder}/agent.sock")
    agent.listen(8)
    monkeypatch.setenv("SSH_AUTH_SOCK", f"{agent_folder}/agent.sock")
    yield {"PARENT": os.getpid(), "TOKEN_FILE": str(home / ".cache" / "huggingface" / "token"),
           "SECRET_NAMES": sorted(SECRETS), "PORT": service.getsockname()[1], "AGENT": f"{agent_folder}/agent.sock"}
    service.close()
    agent.close()
    shutil.rmtree(agent_folder, ignore_errors=True)


def _probe(folder: Path, bait: dict, **options) -> dict:
    values = dict(bait, FOLDER=str(folder), SANDBOXED=options.get("sandbox", True))
    _plant(folder, "\n".join(f"{key} = {value!r}" for key, value in values.items()) + PROBE)
    bait["planted"] = {path.name: path.read_bytes() for path in folder.iterdir() if path.is_file()}
    with pytest.raises(LNSError) as caught:
        load_check(folder, "lns", **options)
    message = str(caught.value)
    assert "\n" not in message and "RuntimeError: PROBE " in message, message
    return json.loads(message.split("RuntimeError: PROBE ", 1)[1])


@pytest.mark.parametrize("user_namespace", [False, True], ids=["as-root-or-self", "user-namespace"])
def test_in_the_sandbox_the_folders_code_reaches_nothing_of_the_user(folder, bait, user_namespace):
    if not user_namespace and os.geteuid() != 0:
        pytest.skip("without a user namespace the namespaces need root")
    found = _probe(folder, bait, user_namespace=user_namespace)
    assert set(found) >= {"parent environ", "stored token", "tcp 127.0.0.1", "ssh agent socket", "undo a mount"}
    reached = {name: outcome for name, outcome in found.items() if not outcome.startswith("blocked")}
    assert reached == {}
    assert {path.name: path.read_bytes() for path in folder.iterdir() if path.is_file()} == bait["planted"]


def test_without_the_sandbox_the_same_code_reaches_them(folder, bait):
    """The probes are real: run as the user, the planted code gets through (the environment alone is
    scrubbed, so the secrets are not in its own)."""
    found = _probe(folder, bait, sandbox=False)
    for name in ("parent environ", "parent cmdline", "other processes", "stored token", "tcp 127.0.0.1",
                 "ssh agent socket", "folder on disk", "loaded folder", "new file in loaded folder"):
        assert found[name] == "reached", (name, found)
    assert found["secret in environment"].startswith("blocked")


# --- the verdict -----------------------------------------------------------------------------------


def test_a_printed_result_and_an_early_exit_do_not_pass(folder):
    forged = {"stage": "load", "exit_status": 0, "log_tail": "",
              "result": {"ok": True, "model_class": "LNSLlamaForCausalLM", "model_module": "transformers_modules.x",
                         "tokenizer_class": "T", "num_parameters": 1, "dtype": "float32", "input_tokens": 1,
                         "logits_shape": [1, 1, 512], "seconds": 0.1, "unexpected_keys": []}}
    _plant(folder, "import json as _j, os as _o, sys as _s\n"
                   f"print('LNS-SANDBOX-REPORT ' + _j.dumps({forged!r}), flush=True)\n"
                   f"print('LNS-PUBLISH-RESULT ' + _j.dumps({forged['result']!r}), flush=True)\n"
                   "_o._exit(0)")
    with pytest.raises(LNSError, match=r"ended without a result \(exit status 0\)"):
        load_check(folder, "lns")


def test_a_written_result_that_contradicts_the_folder_is_refused(folder):
    """The folder's code knows where the loader writes its result; one that does not match the
    checkpoint's own files (the class auto_map names, its vocabulary) does not pass."""
    result = {"ok": True, "model_class": "LlamaForCausalLM", "model_module": "transformers.models.llama.modeling_llama",
              "tokenizer_class": "T", "num_parameters": 260032, "dtype": "float32", "input_tokens": 3,
              "logits_shape": [1, 3, 512], "seconds": 0.1, "unexpected_keys": []}
    _plant(folder, "import json as _j, os as _o, sys as _s\n"
                   f"open(_s.argv[1], 'w').write(_j.dumps({result!r}))\n"
                   "_o._exit(0)")
    with pytest.raises(LNSError, match=r"result does not add up \(class LlamaForCausalLM from transformers\.models"):
        load_check(folder, "lns")


# --- nothing outlives the check --------------------------------------------------------------------

DAEMON = r'''
import os as _os, sys as _sys
if _os.fork() == 0:
    _os.setsid()
    if _os.fork() == 0:
        _os.execv(_sys.executable, [_sys.executable, "-c",
                  "import sys, time\ntime.sleep(600)\nopen(sys.argv[2], 'w').write('outlived the check')",
                  MARK, LATE_FILE])
    _os._exit(0)
_os.wait()
'''


def test_a_daemon_started_by_the_folders_code_ends_with_the_check(folder, tmp_path):
    mark = f"lns-daemon-{os.getpid()}-{time.monotonic_ns()}"
    _plant(folder, f"MARK = {mark!r}\nLATE_FILE = {str(tmp_path / 'late')!r}\n" + DAEMON)
    with _Watch(mark) as watch:
        check = load_check(folder, "lns")
    assert check.model_class == "LNSLlamaForCausalLM" and check.sandboxed  # the genuine result, daemon or not
    assert watch.seen.is_set()
    _wait_until(lambda: not _processes_with(mark), 30, "the daemon's end")


def test_the_time_limit_ends_every_process_of_the_check(folder):
    mark = f"lns-daemon-{os.getpid()}-{time.monotonic_ns()}"
    _plant(folder, f"MARK = {mark!r}\nLATE_FILE = '/dev/null'\n" + DAEMON + "\nimport time as _t\n_t.sleep(3600)")
    with _Watch(mark) as watch, pytest.raises(LNSError, match="did not finish within 45 s"):
        load_check(folder, "lns", timeout=45)
    assert watch.seen.is_set()
    _wait_until(lambda: not _processes_with(mark), 30, "the end of the daemon")


def test_a_killed_push_takes_its_load_check_with_it(folder, tmp_path):
    mark = f"lns-daemon-{os.getpid()}-{time.monotonic_ns()}"
    _plant(folder, f"MARK = {mark!r}\nLATE_FILE = '/dev/null'\n" + DAEMON + "\nimport time as _t\n_t.sleep(3600)")
    push = subprocess.Popen([sys.executable, "-m", "lns_surgery", "push", str(folder), "--repo-id", REPO_ID,
                             "--dry-run", "--check-load"], cwd=tmp_path, stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        _wait_until(lambda: _processes_with(mark) or push.poll() is not None, 300, "the daemon's start")
        assert push.poll() is None, push.stderr.read().decode()
        push.send_signal(signal.SIGKILL)  # no handler, no cleanup: only the kernel and the sandbox act
        push.wait()
        # the daemon, the loader, the namespace's init and unshare: everything named by the push's scratch folder
        _wait_until(lambda: not _processes_with(mark) and not _processes_with(f"lns-load-check-{push.pid}-"),
                    30, "the end of the killed push's load check")
    finally:
        if push.poll() is None:
            push.kill()
        for pid in _processes_with(mark):
            os.kill(pid, signal.SIGKILL)


# --- where no sandbox can be made --------------------------------------------------------------------


def test_without_a_sandbox_the_check_is_refused_unless_accepted(folder, tmp_path, monkeypatch):
    """A machine whose kernel refuses namespaces (as many containers do): one line, nothing run, and
    --check-load-unsandboxed runs the check as the user, saying so."""
    tools = tmp_path / "bin"
    tools.mkdir()
    (tools / "unshare").write_text("#!/bin/sh\necho 'unshare: unshare failed: Operation not permitted' >&2\nexit 1\n")
    (tools / "unshare").chmod(0o755)
    monkeypatch.setenv("PATH", f"{tools}{os.pathsep}{os.environ['PATH']}")
    marker = tmp_path / "the-folders-code-ran"
    _plant(folder, f"open({str(marker)!r}, 'w').close()")

    refused = invoke_cli("push", str(folder), "--repo-id", REPO_ID, "--dry-run", "--check-load")
    assert refused.returncode == 2
    line = refused.stderr.strip().splitlines()[-1]
    assert line.startswith(f"error: cannot publish '{folder}': the load check runs the folder's code in a sandbox")
    assert "(unshare: unshare failed: Operation not permitted)" in line and "--check-load-unsandboxed" in line
    assert not marker.exists()

    accepted = invoke_cli("push", str(folder), "--repo-id", REPO_ID, "--dry-run", "--check-load-unsandboxed")
    assert accepted.returncode == 0, accepted.stderr
    assert "WITHOUT a sandbox" in accepted.stderr + accepted.stdout
    assert "validation: ok: LNSLlamaForCausalLM (custom code from the folder)" in accepted.stdout
    assert marker.exists()  # as the user: it could write anywhere they can
