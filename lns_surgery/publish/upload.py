"""Publishing a checkpoint: check it, write its card, upload exactly the checked files.

Order matters. The token and the Hub are checked first (seconds), then the checkpoint (statically;
with ``check_load`` a fresh process in a sandbox also loads it, running its code), and only then is
anything written remotely: ``create_repo(exist_ok=True)``, ``create_branch`` for ``branch``, one
``upload_folder`` commit. Any refusal before that point leaves the Hub untouched, and the user's
folder is changed (its README.md becomes the card) only once the upload has succeeded. The token is
passed to huggingface_hub and nowhere else: it is not printed, not logged, not given to the check
process, and any message that could echo it is scrubbed.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from lns_surgery.core.errors import LNSError, first_line
from lns_surgery.core.outputs import process_alive
from lns_surgery.publish.card import RenderedCard, render_model_card
from lns_surgery.publish.files import Selection, human_size, select_files, staged_view, view_selection
from lns_surgery.publish.validate import (
    LOAD_CHECK_TIMEOUT_S,
    SandboxUnavailable,
    Validation,
    check_checkpoint,
    load_check,
)

CARD_NAME = "README.md"


@dataclass(frozen=True)
class PushResult:
    repo_id: str
    revision: str  # the branch written to ("main" unless --branch); a pull request targets "main"
    create_pr: bool
    dry_run: bool
    files: Selection  # what went up (or would go up), README.md included
    card: RenderedCard
    validation: Validation
    commit_url: str | None = None
    pr_url: str | None = None
    repo_url: str | None = None


# --- the token ----------------------------------------------------------------------------------


def resolve_token(token: str | None = None) -> str:
    """``token``, else HF_TOKEN, else the stored login (huggingface_hub.get_token()); LNSError if none."""
    if token:
        return token
    from huggingface_hub import get_token

    try:
        found = get_token()
    except Exception as exc:  # e.g. an OIDC exchange that failed; its message names no secret
        raise LNSError(f"could not read the Hugging Face token: {type(exc).__name__}") from None
    if not found:
        raise LNSError("no Hugging Face token: pass --token, set HF_TOKEN, or log in with `hf auth login`")
    return found


def redact(text: str, token: str | None) -> str:
    """``text`` with every occurrence of the token masked, for anything shown to the user."""
    if token:
        text = text.replace(token, "hf_***")
    return text


def _hub_error(exc: BaseException, what: str, endpoint: str, token: str) -> LNSError:
    """One readable line for a failed Hub call, with no trace of the token."""
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    if isinstance(exc, OfflineModeIsEnabled):
        message = "HF_HUB_OFFLINE is set, so nothing can be uploaded (unset it, or use --dry-run)"
    elif isinstance(exc, HfHubHTTPError) and exc.response is not None:
        status = exc.response.status_code
        if status == 401:
            message = f"{what}: the Hub rejected the token (401): check --token, HF_TOKEN or `hf auth login`"
        elif status == 403:
            message = f"{what}: the token may not write there (403): {first_line(exc)}"
        else:
            message = f"{what}: the Hub answered {status}: {first_line(exc)}"
    elif {cls.__name__ for cls in type(exc).__mro__} & {"TimeoutException", "TimeoutError"}:
        message = (f"{what}: the Hub at {endpoint} stopped answering ({type(exc).__name__}); "
                   "--hub-timeout sets how many seconds of silence a push accepts")
    elif _is_connection_error(exc):
        message = f"{what}: cannot reach the Hub at {endpoint} ({type(exc).__name__}: {first_line(exc)})"
    else:
        message = f"{what}: {type(exc).__name__}: {first_line(exc)}"
    return LNSError(redact(message, token))


def _is_connection_error(exc: BaseException) -> bool:
    # By class name: huggingface_hub's HTTP client (httpx, httpx2 or requests) depends on its version.
    names = {cls.__name__ for cls in type(exc).__mro__}
    return bool(names & {"TransportError", "ConnectionError", "TimeoutException", "NetworkError", "TimeoutError"})


# --- the Hub ------------------------------------------------------------------------------------

HUB_TIMEOUT_S = 120  # seconds of silence (connecting, or between bytes) a push accepts from the Hub


@contextlib.contextmanager
def hub_timeout(seconds: float):
    """Give huggingface_hub's shared HTTP client a time limit while a push talks to the Hub.

    The client waits forever by default, so a Hub that accepts the connection and never answers would
    hang the push with no message. The limit is per network operation, not for the whole upload, so a
    large upload that keeps moving is never cut off.
    """
    from huggingface_hub.utils import get_session

    client = get_session()
    previous = client.timeout
    client.timeout = type(previous)(seconds)
    try:
        yield
    finally:
        client.timeout = previous


def _check_account(api, token: str) -> str:
    """Who the token belongs to. Fails fast (a bad token, an unreachable Hub, a read-only token)
    before minutes of checking and uploading."""
    try:
        info = api.whoami(token=token)
    except Exception as exc:
        raise _hub_error(exc, "checking the token", api.endpoint, token) from None
    role = ((info.get("auth") or {}).get("accessToken") or {}).get("role")
    if role == "read":
        raise LNSError("the token is read-only: create a token with write access")
    return info.get("name") or "?"


def _upload(api, view: Path, repo_id: str, *, private: bool, branch: str | None, create_pr: bool, message: str):
    # private=None (not False) lets an organisation's default visibility apply to a new repository
    repo_url = api.create_repo(repo_id, private=True if private else None, exist_ok=True, repo_type="model")
    if branch:
        api.create_branch(repo_id, branch=branch, exist_ok=True)
    commit = api.upload_folder(
        repo_id=repo_id,
        folder_path=view,
        commit_message=message,
        revision=branch,
        create_pr=create_pr,
    )
    return str(repo_url), commit


def _default_message(validation: Validation) -> str:
    info = validation.info
    name = info.source.get("model")  # a Hub id, a builtin: name or a folder's name: check_checkpoint saw to it
    kind = "LayerNorm Scaling (folded)" if info.kind == "lns-folded" else "LayerNorm Scaling"
    return f"Upload {name or info.base_model_type} with {kind} (lns-surgery)"


_CARD_TEMPORARY = f".{CARD_NAME}.lns-tmp-"  # + the writing process's id


def _write_card(folder: Path, text: str) -> None:
    """Replace README.md in the user's folder atomically (a crash never leaves half a card). The
    temporary card of a push killed at this point is this tool's own file: the next push removes it."""
    for leftover in folder.iterdir():
        pid = leftover.name[len(_CARD_TEMPORARY):] if leftover.name.startswith(_CARD_TEMPORARY) else ""
        if pid.isdigit() and not process_alive(int(pid)) and leftover.is_file() and not leftover.is_symlink():
            leftover.unlink(missing_ok=True)
    target = folder / CARD_NAME
    temporary = folder / f"{_CARD_TEMPORARY}{os.getpid()}"
    temporary.write_text(text, encoding="utf-8")
    os.replace(temporary, target)


def _load_check(view: Path, kind: str, files: list[str], timeout: float, allow_unsandboxed: bool, say,
                folder: Path):
    say(f"loading the checkpoint in a fresh process in a sandbox (runs the folder's code, trust_remote_code=True, "
        f"without lns-surgery; at most {timeout:.0f} s) ...")
    try:
        try:
            return load_check(view, kind, timeout=timeout, files=files)
        except SandboxUnavailable as exc:
            if not allow_unsandboxed:
                raise
            say(f"no sandbox can be made here ({exc.reason}): loading it WITHOUT a sandbox, as you, as "
                "--check-load-unsandboxed allows ...")
            return load_check(view, kind, timeout=timeout, files=files, sandbox=False)
    except LNSError as exc:
        raise LNSError(f"cannot publish '{folder}': {exc}") from None


def _check_arguments(repo_id: str, branch: str | None, create_pr: bool, message: str | None) -> None:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        raise LNSError(f"'{repo_id}' is not a Hub repository id (expected NAME or OWNER/NAME)") from None
    if create_pr and branch and branch != "main":
        raise LNSError("--create-pr opens a pull request against the default branch; it cannot be combined with --branch")
    if message is not None and not message.strip():
        raise LNSError("the commit message is empty")


def push(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    private: bool = False,
    branch: str | None = None,
    create_pr: bool = False,
    message: str | None = None,
    token: str | None = None,
    dry_run: bool = False,
    check_load: bool = False,
    endpoint: str | None = None,
    load_timeout: float = LOAD_CHECK_TIMEOUT_S,
    progress: Callable[[str], None] | None = None,
    timeout: float = HUB_TIMEOUT_S,
    allow_unsandboxed: bool = False,
) -> PushResult:
    """Validate ``folder`` and publish it as the model repository ``repo_id``; returns what was done.

    ``dry_run`` does everything except talking to the Hub and writing README.md into the folder: it
    returns the file list, the rendered card and the validation result. ``check_load`` also loads the
    checkpoint in a fresh process, which executes the folder's code, in a sandbox (see
    ``validate.load_check``); where none can be made the push is refused, unless ``allow_unsandboxed``
    accepts running that code as the user. Without ``check_load`` nothing of the folder is run. Raises
    LNSError (one line, token-free) on any refusal or failure; nothing is uploaded then, and the
    folder is left as it was. ``progress`` receives a line
    before each slow step. ``timeout`` is how many seconds of silence from the Hub end the push.
    """
    with hub_timeout(timeout):
        return _push(folder, repo_id, private=private, branch=branch, create_pr=create_pr, message=message,
                     token=token, dry_run=dry_run, check_load=check_load, endpoint=endpoint,
                     load_timeout=load_timeout, progress=progress, allow_unsandboxed=allow_unsandboxed)


def _push(folder, repo_id, *, private, branch, create_pr, message, token, dry_run, check_load, endpoint,
          load_timeout, progress, allow_unsandboxed) -> PushResult:
    say = progress or (lambda line: None)
    folder = Path(folder)
    _check_arguments(repo_id, branch, create_pr, message)
    api = None
    if not dry_run:
        from huggingface_hub import HfApi

        token = resolve_token(token)
        api = HfApi(endpoint=endpoint, token=token)
        _check_account(api, token)

    info = check_checkpoint(folder)
    selection = select_files(folder)
    existing = (folder / CARD_NAME).read_text(encoding="utf-8", errors="replace") if (folder / CARD_NAME).is_file() else None
    card = render_model_card(info, repo_id, existing)
    replacements = {CARD_NAME: card.text}
    with staged_view(selection, replacements) as view:
        uploaded = view_selection(view, selection, replacements)
        load = None
        if check_load:
            load = _load_check(view, info.kind, uploaded.paths(), load_timeout, allow_unsandboxed, say, folder)
        validation = Validation(info, load)
        revision = branch or "main"
        if dry_run:
            return PushResult(repo_id, revision, create_pr, True, uploaded, card, validation)
        say(f"uploading {len(uploaded.files)} files ({human_size(uploaded.total_bytes)}) to {repo_id} ...")
        try:
            repo_url, commit = _upload(api, view, repo_id, private=private, branch=branch, create_pr=create_pr,
                                       message=message or _default_message(validation))
        except Exception as exc:
            raise _hub_error(exc, f"uploading to {repo_id}", api.endpoint, token) from None
    _write_card(folder, card.text)  # only now: a failed push leaves the folder as it was
    return PushResult(repo_id, revision, create_pr, False, uploaded, card, validation,
                      commit_url=commit.commit_url, pr_url=commit.pr_url, repo_url=repo_url)
