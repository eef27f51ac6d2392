"""Who owns an output folder, and what that allows.

``--overwrite`` replaces only a folder whose contents match the manifest lns-surgery wrote into it (or an
empty one); the sweeps of stopped runs' leftovers touch only folders that carry the tool's marker; one
run writes a given ``--out`` at a time, and its final rename never replaces a folder that appeared
meanwhile; a run killed between the two renames of ``--overwrite`` loses neither output; and a
destination that cannot take the output is refused before the work, in one line.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO_ROOT, STORIES, invoke_cli, shared_path, tree_state

from lns_surgery.core import outputs
from lns_surgery.core.errors import LNSError
from lns_surgery.core.outputs import MARKER_NAME

TEXT = "Once upon a time, a little girl named Lily found a shiny red ball in the park.\n" * 8


@pytest.fixture(scope="module")
def stock(tmp_path_factory) -> Path:
    """stories260K as shipped, in a writable copy."""
    folder = tmp_path_factory.mktemp("ownership") / "stories260K"
    shutil.copytree(shared_path(STORIES), folder)
    for path in (folder, *folder.rglob("*")):
        path.chmod(path.stat().st_mode | stat.S_IWUSR)
    return folder


def error_line(result) -> str:
    """The one ``error:`` line of a refused command (exit 2, no traceback)."""
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert result.returncode == 2, result.stdout + result.stderr
    assert len(errors) == 1, result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    return errors[0]


def convert(stock: Path, out: Path, *extra: str):
    return invoke_cli("convert", str(stock), "--out", str(out), *extra)


def ended_pid() -> int:
    """The id of a process that has ended."""
    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(ended.stdout)


# --- the marker is a manifest ---------------------------------------------------------------------


def _assert_manifest_lists_everything(out: Path) -> dict:
    marker = json.loads((out / MARKER_NAME).read_text())
    assert marker["written_by"] == "lns-surgery" and marker["format"] == outputs.MARKER_FORMAT
    assert marker["state"] == "complete" and marker["version"]
    present = {path.relative_to(out).as_posix(): path for path in out.rglob("*") if path.name != MARKER_NAME
               or path.parent != out}
    assert set(marker["files"]) == set(present)  # written last: nothing came after it
    for relative, path in present.items():
        record = marker["files"][relative]
        if path.is_dir():
            assert record == {"kind": "dir"}
        else:
            assert record["kind"] == "file" and record["size"] == path.stat().st_size
            assert record["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert outputs.is_replaceable(out)
    return marker


def test_every_output_lists_what_it_holds(stock, tmp_path):
    assert convert(stock, tmp_path / "lns").returncode == 0
    marker = _assert_manifest_lists_everything(tmp_path / "lns")
    assert {"model.safetensors", "config.json", "modeling_lns.py", "llama2c/tok512.bin"} <= set(marker["files"])

    config = tmp_path / "tiny.json"
    config.write_text(json.dumps({"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2,
                                  "num_attention_heads": 2, "vocab_size": 64}))
    result = invoke_cli("init", "--config", str(config), "--out", str(tmp_path / "scratch"))
    assert result.returncode == 0, result.stderr
    assert "model.safetensors" in _assert_manifest_lists_everything(tmp_path / "scratch")["files"]

    (tmp_path / "data.txt").write_text(TEXT)
    result = invoke_cli("analyze", str(tmp_path / "lns"), "--data", str(tmp_path / "data.txt"), "--out",
                        str(tmp_path / "report"), "--max-tokens", "64", "--seq-len", "32", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    assert "report.json" in _assert_manifest_lists_everything(tmp_path / "report")["files"]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["data.txt", "lns", "report", "scratch", "tiny.json"]


def test_large_files_are_recorded_by_their_ends_and_modification_time(tmp_path, monkeypatch):
    monkeypatch.setattr(outputs, "_WHOLE_FILE_LIMIT", 3 * 2**20)
    folder = tmp_path / "out"
    folder.mkdir()
    weights = folder / "weights.bin"
    weights.write_bytes(os.urandom(4 * 2**20))
    outputs.mark_output(folder)
    record = json.loads((folder / MARKER_NAME).read_text())["files"]["weights.bin"]
    data = weights.read_bytes()
    assert record["size"] == len(data) and record["mtime_ns"] == weights.stat().st_mtime_ns
    assert record["sha256_ends"] == hashlib.sha256(data[:2**20] + data[-2**20:]).hexdigest()
    assert outputs.is_replaceable(folder)
    with open(weights, "r+b") as handle:  # rewritten in place, in the middle, at the same size
        handle.seek(2 * 2**20)
        handle.write(b"\1" * 16)
    with pytest.raises(LNSError, match=r"files changed since lns-surgery wrote them \(weights.bin\)"):
        outputs.remove_output(folder)
    assert weights.is_file()


def test_overwrite_replaces_an_unchanged_output_and_a_plain_copy_of_one(stock, tmp_path):
    out, copy = tmp_path / "out", tmp_path / "copy"
    assert convert(stock, out).returncode == 0
    shutil.copytree(out, copy, copy_function=shutil.copyfile)  # as `cp -r` copies: new modification times
    for folder in (out, copy):
        before = (folder / "config.json").stat().st_ino
        result = convert(stock, folder, "--overwrite")
        assert result.returncode == 0, result.stderr
        assert (folder / "config.json").stat().st_ino != before  # replaced, not left
        _assert_manifest_lists_everything(folder)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["copy", "out"]


def test_refusals_name_a_few_files_and_count_the_rest(stock, tmp_path):
    out = tmp_path / "out"
    assert convert(stock, out).returncode == 0
    for name in ("a.txt", "b.txt", "c.txt", "d.txt", "e.txt"):
        (out / name).write_text("mine")
    (out / "notes").mkdir()
    (out / "notes" / "deep.txt").write_text("mine")
    (out / "config.json").write_text("{}")
    before = tree_state(tmp_path)
    line = error_line(convert(stock, out, "--overwrite"))
    assert "did not write (a.txt, b.txt, c.txt, and 3 more)" in line
    assert "changed since lns-surgery wrote them (config.json)" in line
    assert tree_state(tmp_path) == before


def test_a_working_folder_holds_what_the_trainer_writes_and_nothing_else(tmp_path):
    work = tmp_path / "out.incomplete"
    work.mkdir()
    outputs.mark_output(work, working=True)
    (work / "checkpoint-2").mkdir()
    (work / "checkpoint-2" / "optimizer.pt").write_bytes(b"state")
    (work / "runs" / "today").mkdir(parents=True)
    (work / "metrics.json").write_text("{}")
    (work / "notes.txt").write_text("mine")
    assert not outputs.remove_working_folder(work)
    with pytest.raises(LNSError, match=r"did not write \(notes.txt\)"):
        outputs.remove_output(work)
    assert (work / "notes.txt").read_text() == "mine"
    (work / "notes.txt").unlink()
    assert outputs.remove_working_folder(work)
    assert list(tmp_path.iterdir()) == []


# --- sweeps touch only the tool's own leftovers ---------------------------------------------------


def test_sweeps_leave_folders_that_merely_look_like_leftovers(stock, tmp_path):
    dead = ended_pid()
    lookalikes = {
        f".out.lns-old-{dead}-0123abcd": None,  # no marker at all
        f".out.lns-tmp-{dead}-4567abcd": "{}\n",  # an old-format marker, as earlier versions wrote
        f".out.lns-tmp-{dead}-89abcdef": '{"written_by": "lns-surgery"}\n',  # no manifest
        f".out.lns-old-{dead}-fedcba98": '{"written_by": "lns-surgery"}\n',
    }
    for name, marker in lookalikes.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "thesis.tex").write_text("years of work")
        if marker is not None:
            (tmp_path / name / MARKER_NAME).write_text(marker)
    before = tree_state(tmp_path)
    result = convert(stock, tmp_path / "out")
    assert result.returncode == 0, result.stderr
    assert "removed" not in result.stderr and "restored" not in result.stderr
    after = tree_state(tmp_path)
    assert {key: value for key, value in after.items() if not key.startswith("out")} == before
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted([*lookalikes, "out"])


# --- one run per --out ----------------------------------------------------------------------------

_HOLD_THE_LOCK = """
import sys
from lns_surgery.core import outputs
outputs.lock_output(sys.argv[1])
print("locked", flush=True)
sys.stdin.readline()
outputs.unlock_output(sys.argv[1])
"""


def test_a_second_run_refuses_while_another_writes_the_same_out(stock, tmp_path):
    out = tmp_path / "out"
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"model_name_or_path: {stock}\ndataset_name: {stock / 'SOURCE.txt'}\n"
                      "dataset_format: text\nmax_steps: 1\nuse_cpu: true\nreport_to: none\n")
    holder = subprocess.Popen([sys.executable, "-c", _HOLD_THE_LOCK, str(out)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, cwd=REPO_ROOT)
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = tree_state(tmp_path)
        line = error_line(convert(stock, out))
        assert f"another lns-surgery run (process {holder.pid}) is writing '{out}'" in line
        line = error_line(invoke_cli("sft", "--recipe", str(recipe), "--output_dir", str(out)))
        assert "is writing" in line and "choose another output_dir" in line
        assert tree_state(tmp_path) == before
    finally:
        holder.communicate("\n", timeout=60)
    assert holder.returncode == 0
    assert list(tmp_path.iterdir()) == [tmp_path / "recipe.yaml"]  # the lock file goes with its run


def test_two_conversions_to_one_out_at_once_one_wins_and_the_other_refuses(stock, tmp_path):
    for attempt in range(1):  # whichever way they interleave: the lock or the existing --out stops one
        out = tmp_path / f"out-{attempt}"
        runs = [subprocess.Popen([sys.executable, "-m", "lns_surgery", "convert", str(stock), "--out", str(out),
                                  "--link", "copy"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                 cwd=REPO_ROOT, stdin=subprocess.DEVNULL) for _ in range(2)]
        results = [(run.wait(timeout=300), *run.communicate()) for run in runs]
        codes = sorted(code for code, _, _ in results)
        assert codes == [0, 2], results
        refused = next(stderr for code, _, stderr in results if code == 2)
        errors = [line for line in refused.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1 and ("is writing" in errors[0] or "already exists" in errors[0]), refused
        _assert_manifest_lists_everything(out)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["out-0"]


@pytest.mark.parametrize("appeared", ["empty", "with-a-file"])
def test_the_final_rename_never_replaces_a_folder_that_appeared_meanwhile(stock, tmp_path, monkeypatch, appeared):
    from lns_surgery.conversion import convert as convert_module

    out = tmp_path / "out"
    write_code = convert_module.lns_layers.write_custom_code

    def and_meanwhile(*args, **kwargs):
        write_code(*args, **kwargs)
        out.mkdir()  # another program (or a person) creates --out while the conversion writes
        if appeared == "with-a-file":
            (out / "notes.txt").write_text("mine")

    monkeypatch.setattr(convert_module.lns_layers, "write_custom_code", and_meanwhile)
    line = error_line(convert(stock, out))
    assert f"'{out}' appeared while the output was written; it was left as it is" in line
    assert [path.name for path in tmp_path.iterdir()] == ["out"]
    assert [path.name for path in out.iterdir()] == ([] if appeared == "empty" else ["notes.txt"])


# --- no kill loses the previous output ------------------------------------------------------------

_KILLED_AT = """
import os, signal, sys
from lns_surgery.core import outputs
from lns_surgery.cli import main

where = sys.argv[1]
if where == "between-the-renames":
    move_aside = outputs._move_aside
    def then_killed(out, aside):
        move_aside(out, aside)
        os.kill(os.getpid(), signal.SIGKILL)
    outputs._move_aside = then_killed
else:  # after the new output is in place, before the previous one is removed
    remove = outputs._remove_marker_last
    def killed_first(folder):
        if ".lns-old-" in folder.name:
            os.kill(os.getpid(), signal.SIGKILL)
        remove(folder)
    outputs._remove_marker_last = killed_first
main(sys.argv[2:])
"""


def _killed_overwrite(stock: Path, out: Path, where: str, *flags: str) -> None:
    killed = subprocess.run([sys.executable, "-c", _KILLED_AT, where, "convert", str(stock), "--out", str(out),
                             "--overwrite", *flags], capture_output=True, text=True, cwd=REPO_ROOT,
                            stdin=subprocess.DEVNULL, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]


def test_a_kill_between_the_renames_loses_neither_output(stock, tmp_path):
    out = tmp_path / "out"
    assert convert(stock, out).returncode == 0
    previous = tree_state(out)

    _killed_overwrite(stock, out, "between-the-renames", "--mode", "fold")
    assert not out.exists()
    aside = [path for path in tmp_path.iterdir() if path.name.startswith(".out.lns-old-")]
    assert len(aside) == 1 and tree_state(aside[0]) == previous

    # The next run puts the previous output back before it judges --out: without --overwrite it refuses.
    result = convert(stock, out, "--mode", "fold")
    assert f"restored '{out}' from {aside[0].name}" in result.stderr
    assert "already exists; pass --overwrite" in error_line(result)
    assert tree_state(out) == previous
    assert [path.name for path in tmp_path.iterdir()] == ["out"]  # the dead run's temporary folder and lock went

    # Killed again, then a run with --overwrite: the previous output back first, then replaced.
    _killed_overwrite(stock, out, "between-the-renames", "--mode", "fold")
    result = convert(stock, out, "--overwrite", "--mode", "fold")
    assert result.returncode == 0, result.stderr
    assert "restored" in result.stderr
    assert json.loads((out / "config.json").read_text())["lns_folded"]
    _assert_manifest_lists_everything(out)
    assert [path.name for path in tmp_path.iterdir()] == ["out"]


def test_a_kill_after_the_new_output_is_in_place_leaves_the_old_one_for_the_next_run_to_remove(stock, tmp_path):
    out = tmp_path / "out"
    assert convert(stock, out).returncode == 0
    _killed_overwrite(stock, out, "after-the-swap", "--mode", "fold")
    assert json.loads((out / "config.json").read_text())["lns_folded"]  # the new output is in place
    aside = [path for path in tmp_path.iterdir() if path.name.startswith(".out.lns-old-")]
    assert len(aside) == 1 and json.loads((aside[0] / "config.json").read_text())["lns"]
    assert json.loads((out / MARKER_NAME).read_text())["replaces"] == aside[0].name

    new = tree_state(out)
    result = convert(stock, out)
    assert f"removed 1 previous output(s) that stopped runs left beside '{out}': {aside[0].name}" in result.stderr
    assert "already exists" in error_line(result)
    assert tree_state(out) == new
    assert [path.name for path in tmp_path.iterdir()] == ["out"]


# --- destinations are checked before the work -----------------------------------------------------


def _mount_tmpfs(where: Path, options: str) -> None:
    where.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("needs root to mount a small filesystem")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True,
                             text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")


@pytest.fixture
def small_filesystems(tmp_path):
    """Mount tmpfs folders under tmp_path (``mount(name, options)``), unmounted after the test."""
    mounted = []

    def mount(name: str, options: str) -> Path:
        where = tmp_path / name
        _mount_tmpfs(where, options)
        mounted.append(where)
        return where

    yield mount
    for where in mounted:
        subprocess.run(["umount", str(where)], check=False)


@pytest.fixture
def read_only_folder(tmp_path, small_filesystems):
    """A folder this process cannot write into: permissions for a user, a read-only mount for root."""
    if os.geteuid() != 0:
        folder = tmp_path / "read-only"
        folder.mkdir()
        folder.chmod(0o555)
        yield folder
        folder.chmod(0o755)
    else:
        yield small_filesystems("read-only", "ro,size=1m")


def test_analyze_refuses_a_read_only_destination_before_loading_anything(stock, tmp_path, read_only_folder,
                                                                         monkeypatch):
    import lns_surgery

    def not_now(*args, **kwargs):
        raise AssertionError("a model was loaded before the destination was checked")

    monkeypatch.setattr(lns_surgery, "load_model", not_now)
    (tmp_path / "data.txt").write_text(TEXT)
    before = tree_state(tmp_path)
    result = invoke_cli("analyze", str(stock), "--data", str(tmp_path / "data.txt"), "--out",
                        str(read_only_folder / "reports" / "report"), "--max-tokens", "64", "--seq-len", "32",
                        "--device", "cpu")
    line = error_line(result)
    assert f"cannot write --out '{read_only_folder / 'reports' / 'report'}'" in line
    assert "read-only filesystem" in line or "not writable" in line
    assert tree_state(tmp_path) == before


def test_convert_refuses_a_destination_without_room_for_the_weights(stock, tmp_path, small_filesystems):
    small = small_filesystems("small", "size=256k")
    before = tree_state(stock)
    line = error_line(convert(stock, small / "out"))
    weights = sum(path.stat().st_size for path in stock.rglob("*") if path.is_file())
    assert f"not enough free space for --out '{small / 'out'}': the output needs about {weights / 1e6:.1f} MB" in line
    assert list(small.iterdir()) == [] and tree_state(stock) == before


def test_a_destination_that_fills_up_while_written_is_one_line_and_leaves_nothing(stock, tmp_path, small_filesystems):
    small = small_filesystems("small", "size=16k")
    (tmp_path / "data.txt").write_text(TEXT)
    result = invoke_cli("analyze", str(stock), "--data", str(tmp_path / "data.txt"), "--out", str(small / "report"),
                        "--max-tokens", "64", "--seq-len", "32", "--device", "cpu")
    assert f"no space left where --out '{small / 'report'}' is written" in error_line(result)
    assert list(small.iterdir()) == []


# --- a training run's output ----------------------------------------------------------------------


def test_a_training_output_is_listed_and_overwrite_refuses_it_once_a_file_is_added(stock, tmp_path):
    (tmp_path / "data.txt").write_text(TEXT * 4)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"model_name_or_path: {stock}\ndataset_name: {tmp_path / 'data.txt'}\ndataset_format: text\n"
                      "max_steps: 1\nuse_cpu: true\nreport_to: none\nmax_length: 32\n")
    out = tmp_path / "trained"
    result = invoke_cli("pretrain", "--recipe", str(recipe), "--output_dir", str(out))
    assert result.returncode == 0, result.stderr
    marker = _assert_manifest_lists_everything(out)
    assert {"model.safetensors", "metrics.json", "recipe.yaml"} <= set(marker["files"])

    (out / "notes.txt").write_text("mine")
    before = tree_state(tmp_path)
    line = error_line(invoke_cli("pretrain", "--recipe", str(recipe), "--output_dir", str(out), "--overwrite"))
    assert "did not write (notes.txt)" in line and "choose another output_dir" in line
    assert tree_state(tmp_path) == before  # refused before training: no working folder either
