"""The init process of the load check's sandbox. It imports only the standard library, because it runs
as ``python -I -S sandbox.py SPEC``: inside fresh Linux namespaces made by util-linux ``unshare`` (see
``validate.load_check``), or, when the user accepts running the folder's code as themselves, directly.

In the namespaces it is process 1. It builds a new root file system, switches to it, forks the loader
(the only process that runs the folder's code) without any capability, waits for it, and writes one
report line on its own standard output, which the loader never holds. When it exits, the kernel kills
every process left in the namespace; when the parent that started it goes away (its pipe on
``alive_fd`` closes), it exits at once.

The new root holds, read-only: the system's programs and libraries (``/usr``, ``/bin``, ``/lib*``,
``/etc`` without its password and key files), the Python environment (the interpreter's prefixes and
every folder on its ``sys.path``), ``/sys``, and the checkpoint's files, each bind-mounted on its own
into a folder of their own. Writable, and gone with the namespace: ``/tmp``, ``/dev/shm`` and the
scratch folder (HOME, caches, the loader's result). Nothing else of the file system is there: no home
folders, no ``/run`` (and so no agent sockets), no ``/var``; ``/proc`` is the namespace's own.
"""

from __future__ import annotations

import ctypes
import json
import os
import re
import select
import signal
import sys

REPORT_MARKER = "LNS-SANDBOX-REPORT "
SETUP_FAILED = 121  # the loader's exit status when it could not even start (privileges, exec)
MAX_RESULT_BYTES = 1 << 20

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT = 1, 2, 4, 8, 32
MS_NOATIME, MS_NODIRATIME, MS_BIND, MS_MOVE, MS_REC = 1024, 2048, 4096, 8192, 16384
MS_PRIVATE, MS_RELATIME = 1 << 18, 1 << 21
PR_SET_DUMPABLE, PR_CAPBSET_DROP, PR_SET_SECUREBITS, PR_SET_NO_NEW_PRIVS, PR_CAP_AMBIENT = 4, 24, 28, 38, 47
PR_CAP_AMBIENT_CLEAR_ALL = 4
SECURE_NOROOT_ALL = 0x01 | 0x02 | 0x04 | 0x08 | 0x10 | 0x20  # noroot, no_setuid_fixup, keep_caps: each locked
CAPABILITY_VERSION_3 = 0x20080522

SYSTEM = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc", "/nix/store")
# Inside /etc: what no model needs and a process running as root could read.
ETC_SECRETS = ("shadow", "shadow-", "gshadow", "gshadow-", "sudoers", "sudoers.d", "ssh", "ssl/private",
               "pki/tls/private", "security/opasswd", "credstore", "credstore.encrypted", "wpa_supplicant",
               "NetworkManager/system-connections", "krb5.keytab", "machine-id")
DEVICES = ("null", "zero", "full", "random", "urandom")

_libc = ctypes.CDLL(None, use_errno=True)


class SetupError(Exception):
    """The sandbox could not be built: reported as such, so the check is refused, never run unsandboxed."""


def _encode(value):
    return None if value is None else os.fsencode(value)


def _mount(source, target, fstype, flags, data=None) -> None:
    if _libc.mount(_encode(source), _encode(target), _encode(fstype), ctypes.c_ulong(flags), _encode(data)) != 0:
        error = ctypes.get_errno()
        raise SetupError(f"mount {target}: {os.strerror(error)}")


def _prctl(option: int, value: int = 0) -> int:
    result = _libc.prctl(ctypes.c_int(option), ctypes.c_ulong(value), ctypes.c_ulong(0), ctypes.c_ulong(0),
                         ctypes.c_ulong(0))
    return 0 if result == 0 else ctypes.get_errno()


def _kept_flags(path: str) -> int:
    """The flags a read-only remount of ``path`` must repeat: a mount that came from the parent namespace
    keeps its nosuid/nodev/noexec/atime flags locked, and a remount that drops one is refused."""
    flags = os.statvfs(path).f_flag
    kept = 0
    for statvfs_flag, mount_flag in ((os.ST_NOSUID, MS_NOSUID), (os.ST_NODEV, MS_NODEV), (os.ST_NOEXEC, MS_NOEXEC),
                                     (os.ST_NOATIME, MS_NOATIME), (os.ST_NODIRATIME, MS_NODIRATIME),
                                     (os.ST_RELATIME, MS_RELATIME)):
        if flags & statvfs_flag:
            kept |= mount_flag
    return kept


def _mounts() -> list[tuple[str, bool]]:
    """(mount point, read-only) of every mount this process sees."""
    found = []
    with open("/proc/self/mountinfo", "rb") as handle:
        for line in handle:
            fields = line.split()
            point = re.sub(rb"\\([0-7]{3})", lambda match: bytes([int(match.group(1), 8)]), fields[4])
            found.append((os.fsdecode(point), b"ro" in fields[5].split(b",")))
    return found


def _under(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip("/") + "/")


def _no_link_inside(root: str, path: str) -> bool:
    """Whether ``root + path`` reaches no symbolic link below ``root``: one there (``/lib64 ->
    /usr/lib64``) would lead a new folder or mount out of the new root, onto the real file system."""
    current = root
    for part in path.strip("/").split("/"):
        current = f"{current}/{part}"
        if os.path.islink(current):
            return False
    return True


def _bind(source: str, root: str, path: str, recursive: bool = True) -> None:
    target = root + path
    if os.path.isdir(source):
        os.makedirs(target, exist_ok=True)
    else:
        os.makedirs(os.path.dirname(target), exist_ok=True)
        if not os.path.exists(target):
            with open(target, "wb"):
                pass
    _mount(source, target, None, MS_BIND | (MS_REC if recursive else 0))


def build_root(spec: dict) -> str:
    """Build the new root under the scratch folder and switch to it; returns the checkpoint's folder there."""
    scratch = spec["scratch"]
    root = scratch + "/root"
    _mount(None, "/", None, MS_REC | MS_PRIVATE)  # nothing done here propagates to the real mounts
    os.makedirs(root, exist_ok=True)
    _mount("tmpfs", root, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755")
    # A fresh /tmp first: a Python environment that lives under /tmp (a CI job's venv) is bound into it
    # below, read-only, instead of being hidden by it.
    os.makedirs(root + "/tmp")
    _mount("tmpfs", root + "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777")

    exposed = []
    for path in SYSTEM:
        if os.path.islink(path):  # a merged /usr: /bin -> usr/bin
            os.symlink(os.readlink(path), root + path)
        elif os.path.isdir(path):
            _bind(path, root, path)
            exposed.append(path)
    for name in ETC_SECRETS:
        path = f"/etc/{name}"
        if os.path.lexists(root + path) and _no_link_inside(root, path):
            if os.path.isdir(root + path):
                _mount("tmpfs", root + path, "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, "mode=0755,size=4k")
            else:
                _mount("/dev/null", root + path, None, MS_BIND)
    for path in spec["expose"]:
        real = os.path.realpath(path)
        if not os.path.exists(real) or any(_under(path, done) for done in exposed):
            continue
        if not _no_link_inside(root, path):
            continue  # reached through a link to a system folder: there already
        _bind(real, root, path)
        exposed.append(path)

    os.makedirs(root + "/dev", exist_ok=True)
    _mount("tmpfs", root + "/dev", "tmpfs", MS_NOSUID | MS_NOEXEC, "mode=0755")
    for name in DEVICES:
        _bind(f"/dev/{name}", root, f"/dev/{name}", recursive=False)
    for name, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"), ("stdout", "/proc/self/fd/1"),
                         ("stderr", "/proc/self/fd/2")):
        os.symlink(target, f"{root}/dev/{name}")
    os.makedirs(root + "/dev/shm")
    _mount("tmpfs", root + "/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777")
    os.makedirs(root + "/proc", exist_ok=True)
    try:  # this namespace's processes only; a kernel that refuses (some containers) leaves none at all
        _mount("proc", root + "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC | MS_RDONLY)
    except SetupError:
        pass
    if os.path.isdir("/sys"):
        os.makedirs(root + "/sys", exist_ok=True)
        try:  # without the cgroup and other file systems below it; optional, like /proc
            _mount("/sys", root + "/sys", None, MS_BIND)
        except SetupError:
            pass
    if not _no_link_inside(root, scratch):
        raise SetupError(f"the scratch folder {scratch} is reached through a symbolic link")
    work = root + scratch
    os.makedirs(work, exist_ok=True)
    _mount("tmpfs", work, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0700")
    for name in spec["writable"]:
        os.makedirs(f"{work}/{name}", exist_ok=True)
    model = scratch + "/model"
    os.makedirs(root + model)
    _mount("tmpfs", root + model, "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, "mode=0755")
    for relative, source in spec["files"]:
        _bind(source, root, f"{model}/{relative}", recursive=False)

    writable = {root + "/tmp", work, root + "/dev/shm"}
    for point, read_only in _mounts():
        if _under(point, root) and point not in writable and not read_only:
            _mount(None, point, None, MS_REMOUNT | MS_BIND | MS_RDONLY | _kept_flags(point))
    left = [point for point, read_only in _mounts() if _under(point, root) and point not in writable and not read_only]
    if left:
        raise SetupError(f"{left[0][len(root):] or '/'} could not be made read-only")

    os.chdir(root)
    _mount(root, "/", None, MS_MOVE)
    os.chroot(".")
    os.chdir("/")
    return model


def _drop_privileges(last_capability: int) -> None:
    """No capability in any set, now or after exec (as root too), and no way to gain one: the folder's code
    can then neither undo a mount, nor trace this process, nor leave the new root."""
    if _prctl(PR_SET_NO_NEW_PRIVS, 1):
        raise SetupError("prctl(PR_SET_NO_NEW_PRIVS) failed")
    for capability in range(last_capability + 1):
        error = _prctl(PR_CAPBSET_DROP, capability)
        if error and error != 22:  # EINVAL: a capability this kernel does not have
            raise SetupError(f"cannot drop capability {capability}: {os.strerror(error)}")
    _prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL)  # EINVAL on kernels without ambient capabilities
    error = _prctl(PR_SET_SECUREBITS, SECURE_NOROOT_ALL)
    if error:
        raise SetupError(f"prctl(PR_SET_SECUREBITS) failed: {os.strerror(error)}")
    header = (ctypes.c_uint32 * 2)(CAPABILITY_VERSION_3, 0)
    data = (ctypes.c_uint32 * 6)()  # effective, permitted, inheritable; twice (64 bits)
    if _libc.capset(header, data) != 0:
        raise SetupError(f"capset failed: {os.strerror(ctypes.get_errno())}")


def _start_loader(spec: dict, model: str, last_capability: int) -> int:
    scratch = spec["scratch"]
    pid = os.fork()
    if pid:
        return pid
    try:  # the child: from here on, only os._exit
        log = os.open(f"{scratch}/{spec['log']}", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        null = os.open("/dev/null", os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(log, 1)
        os.dup2(log, 2)
        os.closerange(3, 1 << 16)  # the report channel, the parent's pipe: nothing of this process's
        if spec["sandboxed"]:
            _drop_privileges(last_capability)
        os.chdir(f"{scratch}/{spec['cwd']}")
        python = spec["python"]
        os.execve(python, [python, "-c", spec["script"], f"{scratch}/{spec['result']}", model, *spec["args"]],
                  spec["env"])
    except BaseException as exc:  # noqa: BLE001  (the child must never return into the parent's code)
        try:
            os.write(2, f"sandbox: {exc}\n".encode(errors="replace"))
        finally:
            os._exit(SETUP_FAILED)
    os._exit(SETUP_FAILED)


def _report(**fields) -> None:
    sys.stdout.write(REPORT_MARKER + json.dumps(fields) + "\n")
    sys.stdout.flush()


def _read_tail(path: str, limit: int = 8192) -> str:
    try:
        with open(path, "rb") as handle:
            handle.seek(max(0, os.fstat(handle.fileno()).st_size - limit))
            return handle.read().decode("utf-8", "replace")
    except OSError:
        return ""


def _read_result(path: str):
    try:
        with open(path, "rb") as handle:
            data = handle.read(MAX_RESULT_BYTES + 1)
    except OSError:
        return None
    if len(data) > MAX_RESULT_BYTES:
        return "too large"
    try:
        return json.loads(data)
    except ValueError:
        return "not JSON"


def _supervise(pid: int, alive_fd: int, sandboxed: bool) -> int:
    """Wait for the loader, reaping orphans (process 1 inherits them); end everything if the parent goes."""
    while True:
        readable, _, _ = select.select([alive_fd], [], [], 0.2)
        if readable:  # the pipe closed: whoever asked for the check is gone
            if not sandboxed:
                os.killpg(0, signal.SIGKILL)
            os._exit(1)  # as process 1: the kernel kills every process of the namespace
        while True:
            try:
                done, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return 255
            if done == 0:
                break
            if done == pid:
                return os.waitstatus_to_exitcode(status)


def main(argv: list[str]) -> int:
    with open(argv[1], encoding="utf-8") as handle:
        spec = json.load(handle)
    sandboxed = spec["sandboxed"]
    try:
        with open("/proc/sys/kernel/cap_last_cap", encoding="ascii") as handle:
            last_capability = int(handle.read())
    except (OSError, ValueError):
        last_capability = 63
    try:
        if not sandboxed:
            for name in spec["writable"]:
                os.makedirs(f"{spec['scratch']}/{name}", exist_ok=True)
        model = build_root(spec) if sandboxed else spec["folder"]
        if sandboxed and _prctl(PR_SET_DUMPABLE, 0):  # the loader may not trace it or open its /proc files
            raise SetupError("prctl(PR_SET_DUMPABLE) failed")
    except (SetupError, OSError) as exc:
        _report(stage="setup", reason=str(exc))
        return 0
    pid = _start_loader(spec, model, last_capability)
    status = _supervise(pid, spec["alive_fd"], sandboxed)
    log = _read_tail(f"{spec['scratch']}/{spec['log']}")
    if status == SETUP_FAILED and "\nsandbox: " in "\n" + log:
        _report(stage="setup", reason=log.rsplit("sandbox: ", 1)[1].strip())
        return 0
    _report(stage="load", exit_status=status, result=_read_result(f"{spec['scratch']}/{spec['result']}"),
            log_tail=log)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
