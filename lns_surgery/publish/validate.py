"""Is this checkpoint safe to publish? Checked cheaply always, and for real when asked.

1. ``check_checkpoint`` reads the folder and runs none of its code: the config has the ``lns`` block
   and an ``auto_map`` (or is a stock checkpoint with ``lns_folded``), records its source without a
   path of this machine, every custom-code file that the ``auto_map`` names, and every file those
   import, is there, and the weights match their index (safetensors headers only).
2. ``load_check`` (only when asked: ``push --check-load``) loads the folder the way a stranger would,
   which executes the folder's Python code: in a fresh interpreter where ``lns_surgery`` cannot be
   imported, offline, with ``AutoModelForCausalLM`` and ``AutoTokenizer`` and ``trust_remote_code=True``,
   then runs a short forward and checks that the logits are finite. If this passes, the Hub copy loads
   too, because it holds the same bytes.

The load check's sandbox. The folder's code is a stranger's code, so it runs in new PID, mount,
network, IPC and UTS namespaces (and a user namespace unless the caller is root), made by util-linux
``unshare``, whose init is ``sandbox.py``, a trusted script that imports only the standard library:

- it builds a new root that shows the system folders, the Python environment and the checkpoint's
  files, all read-only, and nothing of the user's (no home folders, no ``/run`` and so no agent
  sockets, no ``/tmp`` but a fresh one); ``/proc`` shows only the namespace's processes; there is no
  network, not even loopback; the environment is an allow-list without credentials, HOME a fresh folder;
- it forks the loader with no capabilities and no way to gain any, so the folder's code cannot undo a
  mount, leave the new root, or trace the init;
- when the loader ends, or the time limit or the end of ``lns-surgery`` (a pipe from it closes; a
  killed ``unshare`` kills the init too) ends the check, the init exits and the kernel kills every
  process of the namespace: nothing the folder's code started outlives the check.

The verdict travels on a channel the folder's code cannot write: the loader writes its result to a
file, the init reads it once the loader has ended and reports it with the loader's exit status on its
own standard output, which the loader never holds. Whatever the folder's code prints is only shown in
an error. The result is then checked against what the folder's files say (the class ``auto_map``
names, the vocabulary the logits must cover); the folder's code runs in the loader's process, so a
result it forges with care could still pass, but nothing it does reaches beyond the sandbox.

Where no sandbox can be made (not Linux, no ``unshare``, user namespaces disabled), the check is
refused unless the caller accepts running the code as themselves (``sandbox=False``,
``--check-load-unsandboxed``): then only the environment is scrubbed and a time limit applies, and
the code can read the user's files and reach the network; whatever leaves the process group outlives it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import site
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from lns_surgery.core import checkpoint
from lns_surgery.core.errors import LNSError
from lns_surgery.core.lns_status import LNSStatus, lns_status
from lns_surgery.core.outputs import scratch_dir
from lns_surgery.publish.files import publish_error
from lns_surgery.publish.sandbox import REPORT_MARKER

LOAD_CHECK_TIMEOUT_S = 600
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
    sandboxed: bool = True

    @property
    def remote_code(self) -> bool:
        return self.model_module.startswith("transformers_modules")

    def summary(self) -> str:
        origin = "custom code from the folder" if self.remote_code else "stock transformers class"
        where = ("in a sandbox (no network, none of your files)" if self.sandboxed
                 else "WITHOUT a sandbox, as you")
        return (f"{self.model_class} ({origin}) and {self.tokenizer_class} loaded in a fresh process without "
                f"lns-surgery, {where}; {self.num_parameters:,} parameters ({self.dtype}); a {self.input_tokens}-token "
                f"forward gave finite logits {list(self.logits_shape)} ({self.seconds:.1f} s)")


@dataclass(frozen=True)
class Validation:
    info: CheckpointInfo
    load: LoadCheck | None  # None: the load check was not asked for, so none of the folder's code ran

    def summary(self) -> str:
        if self.load is None:
            return ("ok: config, custom-code files, weights and tokenizer checked without running the folder's code "
                    "(--check-load also loads it in a fresh, sandboxed process, which runs that code)")
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


def recorded_local_path(lns: dict) -> str | None:
    """The source ``lns`` (an ``lns`` or ``lns_folded`` record) names, if it is a path of a machine, not a Hub id,
    a ``builtin:`` name or a bare folder name. A Hub id has one '/' and is not a path that exists here."""
    from lns_surgery.core.sources import BUILTIN_PREFIX, is_hub_id

    source = lns.get("source")
    model = source.get("model") if isinstance(source, dict) else None
    if not isinstance(model, str) or not model or model.startswith(BUILTIN_PREFIX):
        return None
    if model in (".", "..") or model.startswith(("/", "~", "./", "../")) or "\\" in model or re.match(r"^[A-Za-z]:", model):
        return model
    if "/" in model and not is_hub_id(model):
        return model
    return None


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

    private = recorded_local_path(lns)
    if private is not None:
        block = "lns_folded" if kind == "lns-folded" else "lns"
        raise publish_error(folder, f"config.json records where its source lies on this machine ({block}.source.model "
                                    f"= '{private}'), which publishing would reveal: set it to the source's Hub id or "
                                    "to the folder's name only, as conversions now record it")

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

# Runs in the fresh interpreter, in the sandbox. It may import only what a user of the published model has.
# Its result goes to a file that the sandbox's init (sandbox.py) reads once the process has ended.
_LOAD_SCRIPT = r'''
import json, os, sys, time
sys.modules["lns_surgery"] = None  # prove that the checkpoint's own code is enough
result_path, folder, kind = sys.argv[1], sys.argv[2], sys.argv[3]

def finish(**result):
    with open(result_path + ".partial", "w") as handle:
        json.dump(result, handle)
    os.replace(result_path + ".partial", result_path)
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
# no cloud credentials, no proxies, no agent sockets. Everything else that it would read from HOME is a
# fresh folder.
_CHILD_VARIABLES = ("PATH", "LANG", "LANGUAGE", "LC_ALL", "LC_CTYPE", "TZ", "LD_LIBRARY_PATH",
                    "OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "CUDA_VISIBLE_DEVICES",
                    "VIRTUAL_ENV", "CONDA_PREFIX", "SYSTEMROOT")
# Folders of the scratch folder the loader may write to (in the sandbox: a file system in memory).
_WRITABLE = ("home", "cache", "hf-home", "modules", "work", "tmp", "out")
_HARNESS = Path(__file__).with_name("sandbox.py")


class SandboxUnavailable(LNSError):
    """This machine cannot isolate the folder's code; the check is refused rather than run without."""

    def __init__(self, reason: str):
        self.reason = _one_line(reason)
        super().__init__(
            f"the load check runs the folder's code in a sandbox (Linux namespaces through util-linux `unshare`), "
            f"and none can be made here ({_one_line(reason)}); --check-load-unsandboxed runs it without one, as you: "
            "it can then read your files and credentials and use the network")


def _one_line(text: str) -> str:
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    return "".join(ch if ch.isprintable() else "?" for ch in (lines[0] if lines else ""))[:2000]


def load_check_environment(scratch: Path) -> dict[str, str]:
    """The whole environment of the load-check process: an allow-list of the caller's, offline Hugging
    Face libraries, and HOME, the temporary folder and every cache inside ``scratch``."""
    env = {key: os.environ[key] for key in _CHILD_VARIABLES if key in os.environ}
    env.update(
        HOME=str(scratch / "home"),
        TMPDIR=str(scratch / "tmp"),
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
    return env


def _private_places() -> list[str]:
    """Folders that hold the user's things: the sandbox shows nothing of them, so a path of the Python
    environment that contains one is not shown whole."""
    places = {"/home", "/root", "/run", "/var", "/tmp", "/mnt", "/media", "/srv", tempfile.gettempdir(),
              os.path.expanduser("~"), os.environ.get("HOME") or "/"}
    return sorted({os.path.abspath(place) for place in places if place and place != "/"})


_PATHS_SCRIPT = ("import json, os, sys; print(json.dumps([sys.prefix, sys.exec_prefix, sys.base_prefix, "
                 "sys.base_exec_prefix, os.path.dirname(sys.executable), *sys.path]))")


def _exposed_paths(env: dict[str, str], cwd: Path) -> list[str]:
    """What of the file system, besides the system folders, the loader needs: the interpreter and every
    folder its imports come from, as an interpreter started like the loader (same environment, so no
    PYTHONPATH of the caller's) lists them."""
    try:
        found = subprocess.run([sys.executable, "-c", _PATHS_SCRIPT], env=env, cwd=cwd, capture_output=True,
                               text=True, stdin=subprocess.DEVNULL, timeout=60, check=True)
        candidates = json.loads(found.stdout)
    except (OSError, subprocess.SubprocessError, ValueError):
        candidates = [sys.prefix, sys.exec_prefix, sys.base_prefix, sys.base_exec_prefix, *site.getsitepackages()]
    candidates += [os.path.dirname(sys.executable), os.path.dirname(os.path.realpath(sys.executable)),
                   *env.get("LD_LIBRARY_PATH", "").split(os.pathsep)]
    private = _private_places()
    kept = set()
    for candidate in candidates:
        if not isinstance(candidate, str) or not os.path.isabs(candidate) or not os.path.exists(candidate):
            continue
        path = os.path.abspath(candidate)
        # A folder that holds a private place would show it whole: never shown. A folder below /tmp (a
        # CI job's virtual environment) is bound, read-only, into the sandbox's own fresh /tmp.
        if path == "/" or any(place == path or place.startswith(path.rstrip("/") + "/") for place in private):
            continue
        kept.add(path)
    return sorted(kept)


def _model_files(folder: Path, files) -> list[list[str]]:
    """[relative path, real path] of each file the loader gets: ``files`` (relative paths), or every file."""
    if files is None:
        files = []
        for root, directories, names in os.walk(folder):
            directories.sort()
            files += [(Path(root) / name).relative_to(folder).as_posix() for name in sorted(names)]
    found = []
    for relative in files:
        real = os.path.realpath(folder / relative)
        if os.path.isfile(real):
            found.append([relative, real])
    return found


def _sandbox_command(user_namespace: bool | None) -> list[str]:
    if not sys.platform.startswith("linux"):
        raise SandboxUnavailable(f"it needs Linux, this is {sys.platform}")
    unshare = shutil.which("unshare")
    if unshare is None:
        raise SandboxUnavailable("util-linux `unshare` is not installed")
    if user_namespace is None:
        user_namespace = os.geteuid() != 0  # root can make the namespaces itself; anyone else needs their own
    # --kill-child: if `unshare` dies, the namespace's init dies, and with it every process inside
    flags = ["--fork", "--pid", "--mount", "--net", "--ipc", "--uts", "--kill-child"]
    return [unshare, *flags, *(["--user", "--map-root-user"] if user_namespace else []), "--"]


def _expectations(folder: Path, kind: str) -> tuple[str | None, set[int]]:
    """What a genuine result must say, read from config.json without running anything: the LNS class
    that auto_map names, and the vocabulary size(s) the logits must have."""
    try:
        config = checkpoint.read_config(folder)
    except LNSError:
        return None, set()
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else {}
    vocab = {size for size in (config.get("vocab_size"), text.get("vocab_size")) if isinstance(size, int)}
    model_class = None
    reference = (config.get("auto_map") or {}).get("AutoModelForCausalLM") if kind == "lns" else None
    if isinstance(reference, str):
        model_class = reference.rsplit(".", 1)[-1]
    return model_class, vocab


_RESULT_FIELDS = {"model_class": str, "model_module": str, "tokenizer_class": str, "num_parameters": int,
                  "dtype": str, "input_tokens": int, "logits_shape": list, "seconds": (int, float),
                  "unexpected_keys": list}


def _checked_result(result: dict, kind: str, expected: tuple[str | None, set[int]], sandboxed: bool) -> LoadCheck:
    """The loader's result, once it agrees with what the folder's files say. The folder's code runs in the
    loader's process, so it could write a result of its own; one that contradicts the checkpoint is refused."""
    def refuse(what: str):
        raise LNSError(f"the load check's result does not add up ({what}): something in the loading process, "
                       "such as the folder's code, wrote it instead of the check")

    for name, types in _RESULT_FIELDS.items():
        value = result.get(name)
        if not isinstance(value, types) or isinstance(value, bool):
            refuse(f"'{name}' is missing or not a {getattr(types, '__name__', 'number')}")
    shape = result["logits_shape"]
    if len(shape) != 3 or not all(isinstance(size, int) and not isinstance(size, bool) for size in shape):
        refuse(f"logits of shape {shape}")
    if result["input_tokens"] < 1 or shape[:2] != [1, result["input_tokens"]] or result["num_parameters"] < 1:
        refuse(f"logits {shape} for {result['input_tokens']} tokens")
    model_class, vocab = expected
    if vocab and shape[2] not in vocab:
        refuse(f"logits over {shape[2]} tokens, the config's vocabulary has {sorted(vocab)[0]}")
    if kind == "lns" and (not result["model_module"].startswith("transformers_modules.")
                          or (model_class and result["model_class"] != model_class)):
        refuse(f"class {result['model_class']} from {result['model_module']}, auto_map names {model_class}")
    return LoadCheck(result["model_class"], result["model_module"], result["tokenizer_class"], result["num_parameters"],
                     result["dtype"], result["input_tokens"], tuple(shape), float(result["seconds"]),
                     tuple(str(key) for key in result["unexpected_keys"]), sandboxed)


def load_check(folder: str | os.PathLike, kind: str, timeout: float = LOAD_CHECK_TIMEOUT_S, *,
               files=None, sandbox: bool = True, user_namespace: bool | None = None) -> LoadCheck:
    """Load ``folder`` in a fresh, offline interpreter without lns_surgery; raises LNSError with the reason.

    This executes the folder's custom code (``trust_remote_code=True``). With ``sandbox`` (the default)
    it runs in the sandbox of ``sandbox.py`` and the check is refused (SandboxUnavailable) where none can
    be made; ``sandbox=False`` runs it as the user, with only a scrubbed environment and a time limit.
    ``files`` (paths relative to ``folder``) are what the loader gets, by default every file.
    ``user_namespace`` (default: unless root) also makes a user namespace, as anyone but root needs.
    """
    folder = Path(folder).absolute()
    model_files = _model_files(folder, files)
    expected = _expectations(folder, kind)
    prefix = _sandbox_command(user_namespace) if sandbox else []
    with scratch_dir("load-check") as scratch:
        env = load_check_environment(scratch)
        expose = _exposed_paths(env, scratch) if sandbox else []
        alive_read, alive_write = os.pipe()  # closes when this process ends, however it ends
        spec = {"sandboxed": sandbox, "scratch": str(scratch), "folder": str(folder), "files": model_files,
                "expose": expose, "writable": list(_WRITABLE), "log": "loader.log", "cwd": "work",
                "result": "out/result.json", "python": sys.executable, "script": _LOAD_SCRIPT, "args": [kind],
                "env": env, "alive_fd": alive_read}
        (scratch / "spec.json").write_text(json.dumps(spec), encoding="utf-8")
        command = [*prefix, sys.executable, "-I", "-S", str(_HARNESS), str(scratch / "spec.json")]
        try:
            process = subprocess.Popen(
                command,
                cwd=scratch,  # not the project folder, so nothing of lns_surgery is importable by accident
                env=spec["env"],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                errors="replace",
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # its own process group: a timeout stops whatever it started too
                pass_fds=(alive_read,),
            )
        except OSError as exc:
            os.close(alive_write)
            reason = f"cannot start {command[0]}: {exc.strerror or exc}"
            raise (SandboxUnavailable(reason) if sandbox else LNSError(reason)) from None
        finally:
            os.close(alive_read)
        try:
            stdout, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            _stop_group(process)
            raise LNSError(f"the load check did not finish within {timeout:.0f} s and was stopped "
                           "(the folder's code may hang; a large model may need --check-load-timeout)") from None
        except BaseException:
            _stop_group(process)
            raise
        finally:
            os.close(alive_write)
        _kill_group(process.pid)  # without the sandbox: whatever the folder's code left in the group
    return _outcome(stdout, stderr, process.returncode, kind, expected, sandbox)


def _outcome(stdout: str, stderr: str, returncode: int, kind: str, expected, sandboxed: bool) -> LoadCheck:
    reports = [line[len(REPORT_MARKER):] for line in stdout.splitlines() if line.startswith(REPORT_MARKER)]
    if len(reports) != 1:
        tail = [line for line in (stderr or "").strip().splitlines() if line.strip()]
        detail = tail[-1] if tail else f"exit status {returncode}"
        if sandboxed:
            raise SandboxUnavailable(detail)
        raise LNSError(f"the load check process died: {_one_line(detail)}")
    report = json.loads(reports[0])
    if report["stage"] == "setup":
        if sandboxed:
            raise SandboxUnavailable(report["reason"])
        raise LNSError(f"the load check process could not start: {_one_line(report['reason'])}")
    status, result = report["exit_status"], report["result"]
    if status == 0 and isinstance(result, dict) and result.get("ok") is False:
        raise LNSError(_one_line(result.get("reason", "the load check failed")))
    if status != 0 or not isinstance(result, dict) or result.get("ok") is not True:
        lines = [line for line in report["log_tail"].splitlines() if line.strip()]
        if status == 0 and result is None:
            detail = ("it ended without a result (exit status 0): something in the loading process, such as the "
                      "folder's code, ended it early")
        elif status == 0:
            detail = f"its result is unreadable ({result if isinstance(result, str) else 'not a record'})"
        else:
            reason = f"killed by signal {-status}" if status < 0 else f"exit status {status}"
            detail = f"{_one_line(lines[-1])} ({reason})" if lines else reason
        raise LNSError(f"the load check process died: {detail}")
    return _checked_result(result, kind, expected, sandboxed)


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _stop_group(process: subprocess.Popen) -> None:
    _kill_group(process.pid)
    try:
        process.communicate(timeout=10)
    except subprocess.TimeoutExpired:  # a grandchild that left the group still holds the pipes
        pass


def validate_checkpoint(folder: str | os.PathLike, check_load: bool = False,
                        timeout: float = LOAD_CHECK_TIMEOUT_S, sandbox: bool = True) -> Validation:
    """The static checks on ``folder`` as it is, and with ``check_load`` the load check, which runs the
    folder's code (in the sandbox unless ``sandbox=False``) on the files that would be published;
    raises LNSError("cannot publish ...: reason")."""
    from lns_surgery.publish.files import select_files

    info = check_checkpoint(folder)
    if not check_load:
        return Validation(info, None)
    try:
        load = load_check(info.folder, info.kind, timeout, files=select_files(info.folder).paths(), sandbox=sandbox)
    except LNSError as exc:
        raise publish_error(info.folder, str(exc)) from None
    return Validation(info, load)
