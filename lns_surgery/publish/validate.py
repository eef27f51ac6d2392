"""Is this checkpoint safe to publish? Checked cheaply always, and for real when asked.

1. ``check_checkpoint`` reads the folder and runs none of its code: the config has the ``lns`` block
   and an ``auto_map`` (or is a stock checkpoint with ``lns_folded``), every custom-code file that the
   ``auto_map`` names, and every file those import, is there, and the weights match their index
   (safetensors headers only).
2. ``load_check`` (only when asked: ``push --check-load``) loads the folder the way a stranger would,
   which executes the folder's Python code: in a fresh interpreter where ``lns_surgery`` cannot be
   imported, offline, with ``AutoModelForCausalLM`` and ``AutoTokenizer`` and ``trust_remote_code=True``,
   then runs a short forward and checks that the logits are finite. If this passes, the Hub copy loads
   too, because it holds the same bytes. The child gets no credentials from the environment (a short
   allow-list of variables, a temporary HOME) and a time limit; it is not a sandbox: it runs with the
   user's file permissions.
"""

from __future__ import annotations

import json
import os
import re
import signal
import site
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from lns_surgery.core import checkpoint
from lns_surgery.core.errors import LNSError
from lns_surgery.core.lns_status import LNSStatus, lns_status
from lns_surgery.core.outputs import scratch_dir
from lns_surgery.publish.files import publish_error

LOAD_CHECK_TIMEOUT_S = 600
_RESULT_MARKER = "LNS-PUBLISH-RESULT "
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model")
_RELATIVE_IMPORT = re.compile(r"^\s*(?:from\s+\.(\w+)\s+import|import\s+\.(\w+))", re.MULTILINE)


@dataclass(frozen=True)
class CheckpointInfo:
    """What the folder says about itself, once checked."""

    folder: Path
    kind: str  # "lns" (custom code) or "lns-folded" (stock classes, scales in the weights)
    config: dict
    lns: dict  # the config's ``lns`` or ``lns_folded`` block
    num_layers: int
    code_files: tuple[str, ...]
    weight_files: tuple[str, ...]
    num_tensors: int | None  # None for PyTorch .bin checkpoints (their headers cannot be read safely)

    @property
    def status(self) -> LNSStatus:
        return LNSStatus(self.kind, self.lns)

    @property
    def alpha(self) -> float:
        return self.status.alpha

    @property
    def scales(self) -> tuple[float, ...]:
        """The scale of every block, as the checkpoint computes it."""
        return tuple(self.status.scales(self.num_layers))

    @property
    def base_model_type(self) -> str:
        return self.lns.get("base_model_type") or self.config.get("model_type", "?")

    @property
    def source(self) -> dict:
        source = self.lns.get("source")
        return source if isinstance(source, dict) else {}


@dataclass(frozen=True)
class LoadCheck:
    """What the fresh interpreter saw."""

    model_class: str
    model_module: str
    tokenizer_class: str
    num_parameters: int
    dtype: str
    input_tokens: int
    logits_shape: tuple[int, ...]
    seconds: float
    unexpected_keys: tuple[str, ...] = field(default=())

    @property
    def remote_code(self) -> bool:
        return self.model_module.startswith("transformers_modules")

    def summary(self) -> str:
        origin = "custom code from the folder" if self.remote_code else "stock transformers class"
        return (f"{self.model_class} ({origin}) and {self.tokenizer_class} loaded in a fresh process without "
                f"lns-surgery; {self.num_parameters:,} parameters ({self.dtype}); a {self.input_tokens}-token forward "
                f"gave finite logits {list(self.logits_shape)} ({self.seconds:.1f} s)")


@dataclass(frozen=True)
class Validation:
    info: CheckpointInfo
    load: LoadCheck | None  # None: the load check was not asked for, so none of the folder's code ran

    def summary(self) -> str:
        if self.load is None:
            return ("ok: config, custom-code files, weights and tokenizer checked without running the folder's code "
                    "(--check-load also loads it in a fresh process, which runs that code)")
        return f"ok: {self.load.summary()}"


# --- 1. the folder ------------------------------------------------------------------------------


def _auto_map_modules(folder: Path, auto_map: dict) -> list[str]:
    """The module files named by ``auto_map`` (values are "module.Class", or lists of them for tokenizers)."""
    modules = []
    for auto_class, reference in auto_map.items():
        for name in reference if isinstance(reference, (list, tuple)) else [reference]:
            if not name:
                continue
            if "--" in name:
                raise publish_error(folder, f"auto_map's {auto_class} points at code in another repository ({name}); "
                                            "ship the code in this folder")
            if "." not in name:
                raise publish_error(folder, f"auto_map's {auto_class} entry '{name}' is not 'module.Class'")
            modules.append(name.rsplit(".", 1)[0].replace(".", "/") + ".py")
    return list(dict.fromkeys(modules))


def _custom_code_files(folder: Path, auto_map: dict) -> list[str]:
    """Every code file the checkpoint needs: those in ``auto_map`` and, recursively, their relative imports."""
    pending = [(module, "auto_map") for module in _auto_map_modules(folder, auto_map)]
    found: list[str] = []
    while pending:
        module, needed_by = pending.pop(0)
        if module in found:
            continue
        path = folder / module
        if not path.is_file():
            raise publish_error(folder, f"custom-code file '{module}' (needed by {needed_by}) is missing")
        found.append(module)
        source = path.read_text(encoding="utf-8", errors="replace")
        for match in _RELATIVE_IMPORT.finditer(source):
            pending.append((f"{match.group(1) or match.group(2)}.py", module))
    return found


def check_checkpoint(folder: str | os.PathLike) -> CheckpointInfo:
    """The static checks; raises LNSError("cannot publish ...: reason") on the first problem."""
    folder = Path(folder)
    if not folder.is_dir():
        raise LNSError(f"no such checkpoint folder: '{folder}'")
    if not (folder / "config.json").is_file() and (folder / "adapter_config.json").is_file():
        raise publish_error(folder, "it holds a PEFT adapter, not a model: publish the merged checkpoint")
    try:
        config = checkpoint.read_config(folder)
    except LNSError as exc:
        raise publish_error(folder, str(exc)) from None

    status = lns_status(config)
    kind, lns = status.kind, status.record
    if kind == "lns":
        auto_map = config.get("auto_map")
        if not isinstance(auto_map, dict) or "AutoModelForCausalLM" not in auto_map or "AutoConfig" not in auto_map:
            raise publish_error(folder, "config.json has an `lns` block but no auto_map for AutoConfig and "
                                        "AutoModelForCausalLM, so transformers cannot find its code")
        if config.get("model_type") == lns.get("base_model_type"):
            raise publish_error(folder, f"config.json reuses the stock model_type '{config['model_type']}': without "
                                        "trust_remote_code transformers would silently load the stock class")
        code_files = _custom_code_files(folder, auto_map)
    elif kind == "lns-folded":
        auto_map = config.get("auto_map")
        code_files = _custom_code_files(folder, auto_map) if isinstance(auto_map, dict) else []
    else:
        raise publish_error(folder, "config.json has no `lns` or `lns_folded` block: it is not an LNS checkpoint "
                                    "(convert it first: lns-surgery convert)")

    num_layers = checkpoint.config_num_layers(config)
    if not num_layers or num_layers < 1:
        raise publish_error(folder, "config.json does not say how many layers the model has")

    try:
        tensors = checkpoint.weight_map(folder)
    except LNSError as exc:
        raise publish_error(folder, f"its weights are damaged: {exc}") from None
    if tensors is None:
        weight_files = sorted(path.name for path in folder.glob("pytorch_model*.bin"))
        num_tensors = None
    else:
        weight_files = sorted({entry.file.name for entry in tensors.values()})
        num_tensors = len(tensors)
    if not any((folder / name).is_file() for name in _TOKENIZER_FILES):
        raise publish_error(folder, "it has no tokenizer (tokenizer.json / tokenizer_config.json): save it beside the model")
    return CheckpointInfo(folder, kind, config, lns, num_layers, tuple(code_files), tuple(weight_files), num_tensors)


# --- 2. a stranger's load -----------------------------------------------------------------------

# Runs in the fresh interpreter. It may import only what a user of the published model has.
_LOAD_SCRIPT = r'''
import json, sys, time
sys.modules["lns_surgery"] = None  # prove that the checkpoint's own code is enough
MARKER, folder, kind = sys.argv[1], sys.argv[2], sys.argv[3]

def finish(**result):
    print(MARKER + json.dumps(result), flush=True)
    sys.exit(0)

# lns_surgery's own first_line cannot be imported here; this one also names the exception's type.
def first_line(exc):
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}".rstrip(": ")

start = time.perf_counter()
try:
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
except Exception as exc:
    finish(ok=False, reason=f"torch/transformers cannot be imported: {first_line(exc)}")
try:
    model, loading = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, output_loading_info=True)
except Exception as exc:
    finish(ok=False, reason=f"AutoModelForCausalLM.from_pretrained(trust_remote_code=True) failed: {first_line(exc)}")
missing = sorted(loading.get("missing_keys") or [])
mismatched = sorted(str(item) for item in loading.get("mismatched_keys") or [])
if missing:
    finish(ok=False, reason=f"the weights lack {len(missing)} tensor(s) the model needs, e.g. '{missing[0]}' (it would be random)")
if mismatched:
    finish(ok=False, reason=f"tensor shapes do not match the model: {mismatched[0]}")
module = type(model).__module__
if kind == "lns" and not module.startswith("transformers_modules"):
    finish(ok=False, reason=f"transformers loaded the stock class {type(model).__name__}, not the checkpoint's LNS code")
if kind == "lns" and not getattr(model.config, "lns", None):
    finish(ok=False, reason="the loaded config has no `lns` block")
try:
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
except Exception as exc:
    finish(ok=False, reason=f"AutoTokenizer.from_pretrained(trust_remote_code=True) failed: {first_line(exc)}")
vocab = model.get_output_embeddings().weight.shape[0] if model.get_output_embeddings() is not None else model.config.vocab_size
ids = [i for i in tokenizer("Once upon a time, in a small town,")["input_ids"] if 0 <= i < vocab][:16]
bos = getattr(model.config, "bos_token_id", None)
if isinstance(bos, int) and 0 <= bos < vocab and (not ids or ids[0] != bos):
    ids = [bos] + ids
if not ids:
    ids = [0]
try:
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits
except Exception as exc:
    finish(ok=False, reason=f"the forward pass failed: {first_line(exc)}")
if not bool(torch.isfinite(logits).all()):
    bad = int((~torch.isfinite(logits)).sum())
    finish(ok=False, reason=f"a forward pass on {len(ids)} tokens gave {bad} non-finite logits (NaN/inf): the weights are damaged")
finish(ok=True, model_class=type(model).__name__, model_module=module, tokenizer_class=type(tokenizer).__name__,
       num_parameters=sum(p.numel() for p in model.parameters()), dtype=str(model.dtype).replace("torch.", ""),
       input_tokens=len(ids), logits_shape=list(logits.shape), seconds=time.perf_counter() - start,
       unexpected_keys=sorted(loading.get("unexpected_keys") or [])[:20])
'''

# The child runs the folder's code, so it gets only what loading needs from the environment: no tokens,
# no cloud credentials, no proxies. Everything else that it would read from HOME is a fresh folder.
_CHILD_VARIABLES = ("PATH", "LANG", "LANGUAGE", "LC_ALL", "LC_CTYPE", "TZ", "TMPDIR", "LD_LIBRARY_PATH",
                    "OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "CUDA_VISIBLE_DEVICES",
                    "VIRTUAL_ENV", "CONDA_PREFIX", "SYSTEMROOT")


def load_check_environment(scratch: Path) -> dict[str, str]:
    """The whole environment of the load-check process: an allow-list of the caller's, offline Hugging
    Face libraries, and HOME and every cache inside ``scratch``."""
    env = {key: os.environ[key] for key in _CHILD_VARIABLES if key in os.environ}
    env.update(
        HOME=str(scratch / "home"),
        XDG_CACHE_HOME=str(scratch / "cache"),
        HF_HOME=str(scratch / "hf-home"),
        HF_MODULES_CACHE=str(scratch / "modules"),  # a fresh copy of the custom code, never a stale one
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        HF_HUB_DISABLE_TELEMETRY="1",
        TOKENIZERS_PARALLELISM="false",
        PYTHONDONTWRITEBYTECODE="1",
    )
    if site.ENABLE_USER_SITE and os.path.isdir(site.getusersitepackages()):
        env["PYTHONUSERBASE"] = site.getuserbase()  # packages installed with pip --user stay importable
    for folder in ("home", "cache", "hf-home"):
        (scratch / folder).mkdir(exist_ok=True)
    return env


def load_check(folder: str | os.PathLike, kind: str, timeout: float = LOAD_CHECK_TIMEOUT_S) -> LoadCheck:
    """Load ``folder`` in a fresh, offline interpreter without lns_surgery; raises LNSError with the reason.

    This executes the folder's custom code (``trust_remote_code=True``), in a child process with a
    scrubbed environment, stopped with everything it started after ``timeout`` seconds.
    """
    folder = Path(folder).resolve()
    with scratch_dir("load-check") as scratch:
        process = subprocess.Popen(
            [sys.executable, "-c", _LOAD_SCRIPT, _RESULT_MARKER, str(folder), kind],
            cwd=scratch,  # not the project folder, so nothing of lns_surgery is importable by accident
            env=load_check_environment(scratch),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # its own process group: a timeout stops whatever it started too
        )
        try:
            stdout, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            _stop_group(process)
            raise LNSError(f"the load check did not finish within {timeout:.0f} s and was stopped "
                           "(the folder's code may hang; a large model may need --check-load-timeout)") from None
        except BaseException:
            _stop_group(process)
            raise
    result = None
    for line in stdout.splitlines():
        if line.startswith(_RESULT_MARKER):
            result = json.loads(line[len(_RESULT_MARKER):])
    if result is None:
        tail = [line for line in (stderr or "").strip().splitlines() if line.strip()]
        detail = tail[-1] if tail else f"exit status {process.returncode}"
        raise LNSError(f"the load check process died: {detail}")
    if not result.pop("ok"):
        raise LNSError(result["reason"])
    result["logits_shape"] = tuple(result["logits_shape"])
    result["unexpected_keys"] = tuple(result["unexpected_keys"])
    return LoadCheck(**result)


def _stop_group(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    try:
        process.communicate(timeout=10)
    except subprocess.TimeoutExpired:  # a grandchild that left the group still holds the pipes
        pass


def validate_checkpoint(folder: str | os.PathLike, check_load: bool = False,
                        timeout: float = LOAD_CHECK_TIMEOUT_S) -> Validation:
    """The static checks on ``folder`` as it is, and with ``check_load`` the load check, which runs the
    folder's code; raises LNSError("cannot publish ...: reason")."""
    info = check_checkpoint(folder)
    if not check_load:
        return Validation(info, None)
    try:
        load = load_check(info.folder, info.kind, timeout)
    except LNSError as exc:
        raise publish_error(info.folder, str(exc)) from None
    return Validation(info, load)
