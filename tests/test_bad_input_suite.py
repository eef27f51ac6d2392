"""Nothing lost, nothing run unasked, nothing half-written: every command that writes, given input
that would make it destroy, change or hang on the user's files.

Each row of CASES builds a small project folder, runs one command in-process, and checks that it
exits 2 with one ``error:`` line naming the problem, and that every file, folder and link of the
project (the inputs, the would-be ``--out`` and everything beside it) is exactly as before. Then the
checks that need a real process: the folder's code is not run unless asked for, and when it is asked
for, it runs without credentials and is stopped in time; a convert killed mid-copy leaves nothing at
``--out`` and the next run removes what it left.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import REPO_ROOT, STORIES, invoke_cli, shared_path, tree_state

from lns_surgery.core.outputs import MARKER_NAME

REPO_ID = "tester/stories-lns"
TEXT = "Once upon a time, a little girl named Lily found a shiny red ball in the park.\n" * 8


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """stories260K as shipped, and converted to LNS once for the module."""
    import lns_surgery

    root = tmp_path_factory.mktemp("bad-input-models")
    stock = root / "stories260K"
    shutil.copytree(shared_path(STORIES), stock)
    for path in (stock, *stock.rglob("*")):  # the shared copy is read-only; the cases add files to theirs
        path.chmod(path.stat().st_mode | stat.S_IWUSR)
    lns_surgery.convert(stock, root / "stories-lns")
    return {"stock": stock, "lns": root / "stories-lns"}


# --- the table ------------------------------------------------------------------------------------


@dataclass
class Project:
    """The folder a case builds its inputs in, and what it needs to build them."""

    root: Path
    stock: Path
    lns: Path
    monkeypatch: pytest.MonkeyPatch
    cleanups: list = field(default_factory=list)

    def model(self, relative: str, kind: str = "stock") -> Path:
        target = self.root / relative
        shutil.copytree(self.stock if kind == "stock" else self.lns, target)
        return target

    def text(self, relative: str) -> Path:
        target = self.root / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(TEXT)
        return target

    def foreign_folder(self, relative: str) -> Path:
        """A folder of the user's that lns-surgery did not write."""
        target = self.root / relative
        target.mkdir(parents=True)
        (target / "thesis.tex").write_text("years of work")
        return target

    def earlier_output(self, relative: str) -> Path:
        """A folder an earlier lns-surgery run wrote (a demo's or a study's output), which
        --overwrite may replace as a whole, but never while it holds an input of this run."""
        target = self.root / relative
        target.mkdir(parents=True)
        (target / MARKER_NAME).write_text('{"written_by": "lns-surgery"}\n')
        return target

    def recipe(self, model: Path, data: Path) -> Path:
        target = self.root / "recipe.yaml"
        target.write_text(f"model_name_or_path: {model}\ndataset_name: {data}\ndataset_format: text\n"
                          "max_steps: 1\nuse_cpu: true\nreport_to: none\n")
        return target


def _convert_out_is_input(p):
    model = p.model("models/x")
    (model / MARKER_NAME).write_text("{}\n")  # as `init --no-lns` leaves it
    return ["convert", str(model), "--out", str(model), "--overwrite"]


def _convert_out_contains_input(p):
    p.earlier_output("proj")
    model = p.model("proj/models/x")
    return ["convert", str(model), "--out", str(p.root / "proj"), "--overwrite"]


def _convert_out_inside_input(p):
    model = p.model("base")
    return ["convert", str(model), "--out", str(model / "sub")]


def _convert_out_inside_input_through_a_link(p):
    model = p.model("base")
    (p.root / "shortcut").symlink_to(model, target_is_directory=True)
    return ["convert", str(model), "--out", str(p.root / "shortcut" / "converted")]


def _convert_overwrites_a_foreign_folder(p):
    model = p.model("models/x")
    out = p.foreign_folder("thesis")
    return ["convert", str(model), "--out", str(out), "--overwrite"]


def _convert_input_with_a_fifo(p):
    model = p.model("models/x")
    os.mkfifo(model / "notes.txt")
    return ["convert", str(model), "--out", str(p.root / "out")]


def _convert_input_with_a_socket(p):
    model = p.model("models/x")
    with p.monkeypatch.context() as inside:
        inside.chdir(model)  # a relative name: socket paths are limited to about 100 characters
        server = socket.socket(socket.AF_UNIX)
        server.bind("daemon.sock")  # the file stays after the socket is closed
        server.close()
    return ["convert", str(model), "--out", str(p.root / "out")]


def _convert_input_with_a_link_out_of_it(p):
    model = p.model("models/x")
    (p.root / "private.txt").write_text("not part of the model")
    (model / "notes.txt").symlink_to(p.root / "private.txt")
    return ["convert", str(model), "--out", str(p.root / "out")]


def _fold_out_contains_input(p):
    p.earlier_output("proj")
    model = p.model("proj/models/x-lns", "lns")
    return ["fold", str(model), "--out", str(p.root / "proj"), "--overwrite"]


def _fold_out_inside_input(p):
    model = p.model("x-lns", "lns")
    return ["fold", str(model), "--out", str(model / "folded")]


def _analyze(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return ["analyze", str(model), "--data", str(data), "--out", str(out), "--max-tokens", "64", "--seq-len", "32",
            "--device", "cpu", *extra]


def _analyze_out_is_the_model(p):
    model = p.model("m")
    return _analyze(model, p.text("data.txt"), model, "--overwrite")


def _analyze_out_contains_the_model(p):
    p.earlier_output("proj")
    model = p.model("proj/models/x")
    return _analyze(model, p.text("data.txt"), p.root / "proj", "--overwrite")


def _analyze_out_contains_the_data(p):
    p.earlier_output("proj")
    model = p.model("m")
    return _analyze(model, p.text("proj/data.txt"), p.root / "proj", "--overwrite")


def _analyze_out_inside_the_model(p):
    model = p.model("m")
    return _analyze(model, p.text("data.txt"), model / "report")


def _analyze_out_inside_another_model(p):
    model = p.model("m")
    other = p.model("other", "lns")
    return _analyze(model, p.text("data.txt"), other / "report")


def _analyze_overwrites_a_foreign_folder(p):
    model = p.model("m")
    return _analyze(model, p.text("data.txt"), p.foreign_folder("thesis"), "--overwrite")


def _init_out_contains_its_config(p):
    config = p.earlier_output("proj") / "config.json"
    config.write_text(json.dumps({"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2,
                                  "num_attention_heads": 2, "vocab_size": 64}))
    return ["init", "--config", str(config), "--out", str(p.root / "proj"), "--overwrite"]


def _sft_output_is_the_model(p):
    model = p.model("m")
    recipe = p.recipe(model, p.text("data.txt"))
    return ["sft", "--recipe", str(recipe), "--output_dir", str(model), "--overwrite"]


def _pretrain_output_contains_the_data(p):
    p.earlier_output("proj")
    model = p.model("m")
    recipe = p.recipe(model, p.text("proj/data.txt"))
    return ["pretrain", "--recipe", str(recipe), "--output_dir", str(p.root / "proj"), "--overwrite"]


def _demo_overwrites_a_foreign_folder(p):
    return ["demo", "--out", str(p.foreign_folder("thesis")), "--overwrite"]


def _push_link_out_of_the_folder(p):
    model = p.model("x-lns", "lns")
    (p.root / "credentials").write_text("aws_secret_access_key = abc")
    (model / "notes.txt").symlink_to(p.root / "credentials")
    return ["push", str(model), "--repo-id", REPO_ID, "--dry-run"]


def _push_folder_with_a_fifo(p):
    model = p.model("x-lns", "lns")
    os.mkfifo(model / "notes.txt")
    return ["push", str(model), "--repo-id", REPO_ID, "--dry-run"]


def _hang_on_import(folder: Path) -> None:
    code = folder / "modeling_lns.py"
    code.write_text("import time\ntime.sleep(3600)\n" + code.read_text())


def _push_load_check_that_hangs(p):
    model = p.model("x-lns", "lns")
    _hang_on_import(model)
    return ["push", str(model), "--repo-id", REPO_ID, "--dry-run", "--check-load", "--check-load-timeout", "3"]


def _push_whose_upload_fails(p):
    from lns_surgery.publish import upload

    model = p.model("x-lns", "lns")

    def unreachable(*args, **kwargs):
        raise ConnectionError("connection reset by peer")

    p.monkeypatch.setattr(upload, "_check_account", lambda api, token: "tester")
    p.monkeypatch.setattr(upload, "_upload", unreachable)
    return ["push", str(model), "--repo-id", REPO_ID, "--token", "hf_NotARealToken"]


def _edit_config(folder: Path, **changes) -> Path:
    config = json.loads((folder / "config.json").read_text())
    for key, value in changes.items():
        if "." in key:  # lns.alpha
            outer, inner = key.split(".")
            config[outer][inner] = value
        else:
            config[key] = value
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def _damage_header(model: Path, how: str) -> None:
    """Rewrite the safetensors header in place (same length) so that its offsets lie."""
    import struct

    path = model / "model.safetensors"
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + length])
    name = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])[1]
    begin, end = header[name]["data_offsets"]
    header[name]["data_offsets"] = {"overlap": [begin - 4, end], "reversed": [end, begin],
                                    "shape": [begin, end - 4]}[how]
    encoded = json.dumps(header, separators=(",", ":")).encode()
    path.write_bytes(data[:8] + encoded + b" " * (length - len(encoded)) + data[8 + length:])


def _convert_config_field_of_the_wrong_type(p):
    return ["convert", str(_edit_config(p.model("m"), num_hidden_layers="5")), "--out", str(p.root / "out")]


def _fold_lns_record_that_is_not_an_object(p):
    return ["fold", str(_edit_config(p.model("m", "lns"), lns="yes")), "--out", str(p.root / "out")]


def _fold_alpha_out_of_range(p):
    return ["fold", str(_edit_config(p.model("m", "lns"), **{"lns.alpha": 3.0})), "--out", str(p.root / "out")]


def _analyze_alpha_out_of_range(p):
    return _analyze(_edit_config(p.model("m", "lns"), **{"lns.alpha": 3.0}), p.text("data.txt"), p.root / "out")


def _convert_index_names_a_file_outside(p):
    model = p.model("m")
    (model / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {"model.embed_tokens.weight": "../elsewhere.safetensors"}}))
    return ["convert", str(model), "--out", str(p.root / "out")]


def _damaged_offsets(how, mode):
    def setup(p):
        model = p.model("m")
        _damage_header(model, how)
        return ["convert", str(model), "--out", str(p.root / "out"), "--mode", mode]
    return setup


def _convert_layers_not_a_block_list(p):
    return ["convert", str(p.model("m")), "--out", str(p.root / "out"), "--layers", "model.norm"]


def _convert_norm_named_twice(p):
    return ["convert", str(p.model("m")), "--out", str(p.root / "out"), "--norms", "input_layernorm,input_layernorm"]


def _convert_norm_that_is_not_a_pre_norm(p):
    return ["convert", str(p.model("m")), "--out", str(p.root / "out"), "--norms", "input_layernorm,self_attn.q_proj"]


def _convert_final_norm(p):
    return ["convert", str(p.model("m")), "--out", str(p.root / "out"), "--layers", "model.layers", "--norms", "input_layernorm,norm"]


def _convert_unknown_option(p):
    return ["convert", str(p.model("m")), "--out", str(p.root / "out"), "--bogus"]


def _analyze_custom_code_without_trust(p):
    model = _edit_config(p.model("m"), model_type="someones_own",
                         auto_map={"AutoConfig": "configuration_own.OwnConfig", "AutoModelForCausalLM": "modeling_own.Own"})
    (model / "configuration_own.py").write_text("raise SystemExit('the folder code ran')\n")
    return _analyze(model, p.text("data.txt"), p.root / "out")


def _analyze_binary_data(p):
    data = p.root / "data.txt"
    data.write_bytes(bytes(range(256)) * 8)
    return _analyze(p.model("m"), data, p.root / "out")


def _recipe(p, extra: str, data: Path | None = None) -> Path:
    recipe = p.recipe(p.model("m"), data or p.text("data.txt"))
    recipe.write_text(recipe.read_text() + extra)
    return recipe


def _sft_recipe_value(extra: str):
    def setup(p):
        return ["sft", "--recipe", str(_recipe(p, extra)), "--output_dir", str(p.root / "out")]
    return setup


def _sft_empty_data(p):
    empty = p.root / "empty.jsonl"
    empty.write_text("")
    return ["sft", "--recipe", str(_recipe(p, "", empty)), "--output_dir", str(p.root / "out")]


def _silent_hub(p) -> str:
    """A local endpoint that accepts connections and never answers, alive for the rest of the test."""
    import threading

    from huggingface_hub import constants

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    held = []

    def accept_and_hold():
        while True:
            try:
                held.append(server.accept()[0])
            except OSError:  # closed at the end of the test
                return

    threading.Thread(target=accept_and_hold, daemon=True).start()
    url = f"http://127.0.0.1:{server.getsockname()[1]}"
    p.monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    p.monkeypatch.setattr(constants, "ENDPOINT", url)
    p.monkeypatch.setenv("HF_ENDPOINT", url)
    p.cleanups.append(server.close)
    return url


def _push_to_a_hub_that_never_answers(p):
    model = p.model("x-lns", "lns")
    _silent_hub(p)
    return ["push", str(model), "--repo-id", REPO_ID, "--token", "hf_NotARealToken", "--hub-timeout", "2"]


@dataclass(frozen=True)
class Case:
    id: str
    setup: Callable[[Project], list[str]]
    message: str  # a fragment of the one error line


CASES = [
    Case("convert-out-is-the-input", _convert_out_is_input, "is the input"),
    Case("convert-out-contains-the-input", _convert_out_contains_input, "contains the input"),
    Case("convert-out-inside-the-input", _convert_out_inside_input, "lies inside the input"),
    Case("convert-out-inside-the-input-through-a-link", _convert_out_inside_input_through_a_link, "lies inside the input"),
    Case("convert-overwrite-of-a-foreign-folder", _convert_overwrites_a_foreign_folder, "not written by lns-surgery"),
    Case("convert-input-holds-a-fifo", _convert_input_with_a_fifo, "is a named pipe (FIFO)"),
    Case("convert-input-holds-a-socket", _convert_input_with_a_socket, "is a socket"),
    Case("convert-input-links-out-of-itself", _convert_input_with_a_link_out_of_it, "outside the folder"),
    Case("fold-out-contains-the-input", _fold_out_contains_input, "contains the input"),
    Case("fold-out-inside-the-input", _fold_out_inside_input, "lies inside the input"),
    Case("analyze-out-is-the-model", _analyze_out_is_the_model, "is the input"),
    Case("analyze-out-contains-the-model", _analyze_out_contains_the_model, "contains the input"),
    Case("analyze-out-contains-the-data", _analyze_out_contains_the_data, "contains the input"),
    Case("analyze-out-inside-the-model", _analyze_out_inside_the_model, "lies inside the input"),
    Case("analyze-out-inside-another-model", _analyze_out_inside_another_model, "inside the model folder"),
    Case("analyze-overwrite-of-a-foreign-folder", _analyze_overwrites_a_foreign_folder, "not written by lns-surgery"),
    Case("init-out-contains-its-config", _init_out_contains_its_config, "contains the input"),
    Case("sft-output-is-the-model", _sft_output_is_the_model, "is the input"),
    Case("pretrain-output-contains-the-data", _pretrain_output_contains_the_data, "contains the input"),
    Case("demo-overwrite-of-a-foreign-folder", _demo_overwrites_a_foreign_folder, "not written by lns-surgery"),
    Case("push-link-out-of-the-folder", _push_link_out_of_the_folder, "outside the folder"),
    Case("push-folder-holds-a-fifo", _push_folder_with_a_fifo, "is a named pipe (FIFO)"),
    Case("push-load-check-that-hangs", _push_load_check_that_hangs, "did not finish within 3 s"),
    Case("push-whose-upload-fails", _push_whose_upload_fails, "cannot reach the Hub"),
    Case("push-to-a-hub-that-never-answers", _push_to_a_hub_that_never_answers, "stopped answering"),
    Case("convert-config-field-of-the-wrong-type", _convert_config_field_of_the_wrong_type, "expected int, got str"),
    Case("fold-lns-record-not-an-object", _fold_lns_record_that_is_not_an_object, "'lns' must be an object"),
    Case("fold-alpha-out-of-range", _fold_alpha_out_of_range, "'lns.alpha' must be a number from 0 to 1"),
    Case("analyze-alpha-out-of-range", _analyze_alpha_out_of_range, "'lns.alpha' must be a number from 0 to 1"),
    Case("convert-index-names-a-file-outside", _convert_index_names_a_file_outside, "not a file in the checkpoint's folder"),
    Case("convert-overlapping-offsets", _damaged_offsets("overlap", "code"), "is damaged"),
    Case("convert-offsets-end-before-start", _damaged_offsets("reversed", "code"), "is damaged"),
    Case("fold-offsets-disagree-with-the-shape", _damaged_offsets("shape", "fold"), "is damaged"),
    Case("convert-layers-not-a-block-list", _convert_layers_not_a_block_list, "not the list of decoder blocks"),
    Case("convert-norm-named-twice", _convert_norm_named_twice, "more than once"),
    Case("convert-norm-that-is-not-a-pre-norm", _convert_norm_that_is_not_a_pre_norm, "is not a pre-sublayer norm"),
    Case("convert-final-norm", _convert_final_norm, "pass --force"),
    Case("convert-unknown-option", _convert_unknown_option, "No such option '--bogus'"),
    Case("analyze-binary-data", _analyze_binary_data, "is not UTF-8 text"),
    Case("analyze-custom-code-without-trust", _analyze_custom_code_without_trust, "pass --trust-remote-code"),
    Case("sft-recipe-export-not-a-choice", _sft_recipe_value("export: zip\n"), "export must be one of"),
    Case("sft-recipe-format-not-a-choice", _sft_recipe_value("dataset_format: csv\n"), "dataset_format"),
    Case("sft-recipe-learning-rate-a-list", _sft_recipe_value("learning_rate: [1, 2]\n"), "must be a number"),
    Case("sft-empty-data", _sft_empty_data, "is empty"),
]


# --- output ownership: --overwrite replaces only what lns-surgery wrote, as it wrote it ----------------


def _earlier_conversion(p, relative: str = "out") -> Path:
    import lns_surgery

    return lns_surgery.convert(p.stock, p.root / relative)


def _convert_overwrite_of_an_output_a_file_was_added_to(p):
    out = _earlier_conversion(p)
    (out / "notes.txt").write_text("mine")
    return ["convert", str(p.model("m")), "--out", str(out), "--overwrite"]


def _convert_overwrite_of_a_copy_a_file_was_added_to(p):
    copy = p.root / "copy"
    shutil.copytree(_earlier_conversion(p), copy, copy_function=shutil.copyfile)  # as `cp -r` copies
    (copy / "notes.txt").write_text("mine")
    return ["convert", str(p.model("m")), "--out", str(copy), "--overwrite"]


def _convert_overwrite_of_an_output_with_a_changed_file(p):
    out = _edit_config(_earlier_conversion(p), max_position_embeddings=4096)  # tuned by hand
    return ["convert", str(p.model("m")), "--out", str(out), "--overwrite", "--mode", "fold"]


def _analyze_overwrite_of_a_folder_with_a_planted_marker(p):
    folder = p.foreign_folder("thesis")
    (folder / MARKER_NAME).write_text("")
    return _analyze(p.model("m"), p.text("data.txt"), folder, "--overwrite")


def _init_overwrite_of_an_old_format_output(p):
    out = p.earlier_output("old")  # a bare marker, as earlier versions wrote: no list of what it wrote
    (out / "model.safetensors").write_bytes(b"weights")
    config = p.root / "tiny.json"
    config.write_text(json.dumps({"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2,
                                  "num_attention_heads": 2, "vocab_size": 64}))
    return ["init", "--config", str(config), "--out", str(out), "--overwrite"]


def _sft_overwrite_of_an_output_a_file_was_added_to(p):
    out = _earlier_conversion(p, "trained")
    (out / "notes.txt").write_text("mine")
    return ["sft", "--recipe", str(p.recipe(p.model("m"), p.text("data.txt"))), "--output_dir", str(out), "--overwrite"]


def _demo_overwrite_of_an_output_a_file_was_added_to(p):
    out = _earlier_conversion(p, "demo")
    (out / "notes.txt").write_text("mine")
    return ["demo", "--out", str(out), "--overwrite"]


def _convert_while_another_run_writes_out(p):
    lock = p.root / ".out.lns-lock"
    lock.write_text("")
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, sys; f = open(sys.argv[1]); "
                               "fcntl.flock(f, fcntl.LOCK_EX); print('locked', flush=True); sys.stdin.read()",
                               str(lock)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    p.cleanups.append(lambda: holder.communicate("", timeout=60))
    return ["convert", str(p.model("m")), "--out", str(p.root / "out")]


CASES += [
    Case("convert-overwrite-of-an-output-a-file-was-added-to", _convert_overwrite_of_an_output_a_file_was_added_to,
         "did not write (notes.txt)"),
    Case("convert-overwrite-of-a-copy-a-file-was-added-to", _convert_overwrite_of_a_copy_a_file_was_added_to,
         "did not write (notes.txt)"),
    Case("convert-overwrite-of-an-output-with-a-changed-file", _convert_overwrite_of_an_output_with_a_changed_file,
         "changed since lns-surgery wrote them (config.json)"),
    Case("analyze-overwrite-of-a-folder-with-a-planted-marker", _analyze_overwrite_of_a_folder_with_a_planted_marker,
         "delete the folder by hand"),
    Case("init-overwrite-of-an-old-format-output", _init_overwrite_of_an_old_format_output, "delete the folder by hand"),
    Case("sft-overwrite-of-an-output-a-file-was-added-to", _sft_overwrite_of_an_output_a_file_was_added_to,
         "did not write (notes.txt)"),
    Case("demo-overwrite-of-an-output-a-file-was-added-to", _demo_overwrite_of_an_output_a_file_was_added_to,
         "did not write (notes.txt)"),
    Case("convert-while-another-run-writes-out", _convert_while_another_run_writes_out, "is writing"),
]


# --- records re-proved, copies checked, reading bounded, one line for each mistake -------------------


def _folded(p, relative: str = "folded") -> Path:
    import lns_surgery

    return lns_surgery.convert(p.stock, p.root / relative, mode="fold")


def _fold_record_names_another_fold_rule(p):
    model = _edit_config(p.model("m", "lns"), **{"lns.fold_rule": "one_plus"})
    return ["fold", str(model), "--out", str(p.root / "out")]


def _push_folded_record_with_nonsense_scales(p):
    return ["push", str(_edit_config(_folded(p), **{"lns_folded.scales": [1.0, -3.0, 7.0]})), "--repo-id", REPO_ID,
            "--dry-run"]


def _analyze_folded_record_with_scales_its_alpha_does_not_give(p):
    model = _edit_config(_folded(p), **{"lns_folded.scales": [1.0, 0.5, 0.5, 0.5, 0.5]})
    return _analyze(model, p.text("data.txt"), p.root / "out")


def _fold_config_claims_fewer_blocks_than_the_weights(p):
    return ["fold", str(_edit_config(p.model("m", "lns"), num_hidden_layers=4)), "--out", str(p.root / "out")]


def _convert_config_claims_more_blocks_than_the_weights(p):
    model = _edit_config(p.model("m"), num_hidden_layers=6)
    return ["convert", str(model), "--out", str(p.root / "out"), "--mode", "fold"]


def _weights_changed_during_the_copy(command: str):
    """Another program truncates the shard while it is copied, and puts it back afterwards."""
    def setup(p):
        from lns_surgery.core import checkpoint

        original = checkpoint.copy_file

        def copy_file(source, target, link="auto"):
            how = original(source, target, link="copy")
            if target.name.endswith(".safetensors"):
                with open(target, "r+b") as handle:
                    handle.truncate(target.stat().st_size // 2)
            return how

        p.monkeypatch.setattr(checkpoint, "copy_file", copy_file)
        model = p.model("m", "lns" if command == "fold" else "stock")
        return [command, str(model), "--out", str(p.root / "out")]
    return setup


def _record_over_the_bound(p) -> Path:
    from lns_surgery.core.records import MAX_RECORD_BYTES

    data = p.root / "data.jsonl"
    with open(data, "w") as handle:
        handle.write('{"text": "Once upon a time."}\n{"text": "')
        handle.write("a" * (MAX_RECORD_BYTES + 1))
        handle.write('"}\n')
    return data


def _analyze_jsonl_record_over_the_bound(p):
    return _analyze(p.model("m"), _record_over_the_bound(p), p.root / "out", "--max-tokens", "1000000")


def _sft_jsonl_record_over_the_bound(p):
    recipe = p.recipe(p.model("m"), _record_over_the_bound(p))
    return ["sft", "--recipe", str(recipe), "--output_dir", str(p.root / "out")]


def _analyze_nul_bytes(p):
    data = p.root / "data.txt"
    data.write_bytes(b"\0" * 1_000_000)
    return _analyze(p.model("m"), data, p.root / "out")


def _fold_config_field_of_the_wrong_type(p):
    return ["fold", str(_edit_config(p.model("m", "lns"), num_hidden_layers="5")), "--out", str(p.root / "out")]


def _symlink_loop(p, kind: str) -> Path:
    model = p.model("m", kind)
    (model / "notes.txt").symlink_to(model / "more-notes.txt")
    (model / "more-notes.txt").symlink_to(model / "notes.txt")
    return model


def _convert_input_holds_a_symlink_loop(p):
    return ["convert", str(_symlink_loop(p, "stock")), "--out", str(p.root / "out")]


def _push_folder_holds_a_symlink_loop(p):
    return ["push", str(_symlink_loop(p, "lns")), "--repo-id", REPO_ID, "--dry-run"]


def _analyze_pickle_only_checkpoint(p):
    import torch

    model = p.model("m")
    (model / "model.safetensors").unlink()
    torch.save(torch.nn.Linear(2, 2), model / "pytorch_model.bin")  # a pickled module, not a state dict
    return _analyze(model, p.text("data.txt"), p.root / "out")


def _config_is_a_json_list(command: str):
    def setup(p):
        model = p.model("m")
        (model / "config.json").write_text("[1, 2, 3]")
        if command == "analyze":
            return _analyze(model, p.text("data.txt"), p.root / "out")
        return [command, str(model), "--out", str(p.root / "out")]
    return setup


CASES += [
    Case("fold-record-names-another-fold-rule", _fold_record_names_another_fold_rule, "own math needs 'scale'"),
    Case("push-folded-record-with-nonsense-scales", _push_folded_record_with_nonsense_scales, "'lns_folded.scales'"),
    Case("analyze-folded-record-with-scales-its-alpha-does-not-give",
         _analyze_folded_record_with_scales_its_alpha_does_not_give, "but its alpha 1.0 gives"),
    Case("fold-config-claims-fewer-blocks-than-the-weights", _fold_config_claims_fewer_blocks_than_the_weights,
         "the weight files hold block 4"),
    Case("convert-config-claims-more-blocks-than-the-weights", _convert_config_claims_more_blocks_than_the_weights,
         "hold no tensor of block 5"),
    Case("convert-shard-truncated-during-the-copy", _weights_changed_during_the_copy("convert"),
         "'model.safetensors' changed while it was being copied"),
    Case("fold-shard-truncated-during-the-copy", _weights_changed_during_the_copy("fold"),
         "'model.safetensors' changed while it was being copied"),
    Case("analyze-jsonl-record-over-the-bound", _analyze_jsonl_record_over_the_bound,
         "data.jsonl, line 2: the record is over 64 MB"),
    Case("sft-jsonl-record-over-the-bound", _sft_jsonl_record_over_the_bound, "data.jsonl, line 2: the record is over 64 MB"),
    Case("analyze-nul-bytes", _analyze_nul_bytes, "is not text: 100% of its characters are control characters"),
    Case("fold-config-field-of-the-wrong-type", _fold_config_field_of_the_wrong_type, "expected int, got str"),
    Case("convert-input-holds-a-symlink-loop", _convert_input_holds_a_symlink_loop, "never reaches a file (a loop)"),
    Case("push-folder-holds-a-symlink-loop", _push_folder_holds_a_symlink_loop, "never reaches a file (a loop)"),
    Case("analyze-pickle-only-checkpoint", _analyze_pickle_only_checkpoint, "cannot be read safely"),
    Case("convert-config-is-a-json-list", _config_is_a_json_list("convert"), "holds a JSON list"),
    Case("fold-config-is-a-json-list", _config_is_a_json_list("fold"), "holds a JSON list"),
    Case("analyze-config-is-a-json-list", _config_is_a_json_list("analyze"), "holds a JSON list"),
]


def _push_config_records_a_local_source_path(p):
    model = _edit_config(p.model("x-lns", "lns"), **{"lns.source": {"model": "/home/me/models/stories260K"}})
    return ["push", str(model), "--repo-id", REPO_ID, "--dry-run"]


CASES += [
    Case("push-config-records-a-local-source-path", _push_config_records_a_local_source_path,
         "records where its source lies on this machine (lns.source.model = '/home/me/models/stories260K')"),
]


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_bad_input_is_refused_and_changes_nothing(case, models, tmp_path, monkeypatch):
    project = Project(tmp_path / "project", models["stock"], models["lns"], monkeypatch)
    project.root.mkdir()
    argv = case.setup(project)
    before = tree_state(project.root)

    started = time.monotonic()
    try:
        result = invoke_cli(*argv)
    finally:
        for cleanup in project.cleanups:
            cleanup()
    seconds = time.monotonic() - started

    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert result.returncode == 2, result.stdout + result.stderr
    assert len(errors) == 1 and case.message in errors[0], result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    assert tree_state(project.root) == before  # inputs, --out and everything beside it untouched
    assert seconds < 60, f"{case.id} took {seconds:.0f} s"


# --- nothing of the folder runs unless asked for ------------------------------------------------


def test_dry_run_runs_none_of_the_folders_code(models, tmp_path):
    folder = tmp_path / "x-lns"
    shutil.copytree(models["lns"], folder)
    _hang_on_import(folder)  # importing it would hang for an hour
    before = tree_state(tmp_path)
    started = time.monotonic()
    result = invoke_cli("push", str(folder), "--repo-id", REPO_ID, "--dry-run")
    assert result.returncode == 0, result.stderr
    assert time.monotonic() - started < 30
    assert "without running the folder's code" in result.stdout
    assert "dry run: nothing was uploaded and nothing was written" in result.stdout
    assert tree_state(tmp_path) == before


def test_the_load_check_runs_without_credentials(models, tmp_path, monkeypatch):
    folder = tmp_path / "x-lns"
    shutil.copytree(models["lns"], folder)
    secrets = {"AWS_SECRET_ACCESS_KEY": "aws-secret", "HF_TOKEN": "hf_secret", "GITHUB_TOKEN": "gh-secret",
               "OPENAI_API_KEY": "sk-secret", "HTTPS_PROXY": "http://user:password@proxy:3128"}
    # The sandbox lets nothing out but the check's verdict: the folder's code fails the check if it sees a secret.
    code = folder / "modeling_lns.py"
    code.write_text(f"import json as _json, os as _os\n"
                    f"_seen = _json.dumps(dict(_os.environ))\n"
                    f"if any(_value in _seen for _value in {sorted(secrets.values())!r}) or "
                    f"'lns-load-check-' not in _os.environ['HOME'] or _os.environ['HOME'] == {os.path.expanduser('~')!r} "
                    f"or _os.environ.get('HF_HUB_OFFLINE') != '1':\n"
                    f"    raise RuntimeError('the folder code saw: ' + _seen)\n" + code.read_text())
    for key, value in secrets.items():
        monkeypatch.setenv(key, value)

    result = invoke_cli("push", str(folder), "--repo-id", REPO_ID, "--dry-run", "--check-load")
    assert result.returncode == 0, result.stderr
    assert "validation: ok: LNSLlamaForCausalLM (custom code from the folder)" in result.stdout


# --- leftovers of stopped runs --------------------------------------------------------------------


def test_a_live_runs_temporary_folder_is_left_alone(models, tmp_path):
    """A temporary folder whose marker is locked belongs to a run still writing: never removed."""
    live = tmp_path / f".out.lns-tmp-{os.getpid()}-0123abcd"
    live.mkdir()
    with open(live / MARKER_NAME, "w") as marker:
        fcntl.flock(marker.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        result = invoke_cli("convert", str(models["stock"]), "--out", str(tmp_path / "out"))
        assert result.returncode == 0, result.stderr
        assert "removed" not in result.stderr
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted([live.name, "out"])


def test_push_removes_the_scratch_folders_that_killed_runs_left_and_keeps_live_ones(models, tmp_path, monkeypatch):
    """push stages its upload and runs its load check in scratch folders of the system temp dir. A
    SIGKILL leaves them there; the next push removes those whose process is gone, and says so."""
    temp = tmp_path / "temp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = temp / f"lns-publish-{int(ended.stdout)}-0123abcd"  # its marker is unlocked: nobody holds it
    (dead / "view").mkdir(parents=True)
    (dead / MARKER_NAME).write_text('{"written_by": "lns-surgery", "format": 2, "state": "writing", "files": {}}')
    (dead / "view" / "model.safetensors").write_bytes(b"half an upload")
    live = temp / f"lns-load-check-{os.getpid()}-4567abcd"
    live.mkdir()
    with open(live / MARKER_NAME, "w") as marker:
        fcntl.flock(marker.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)  # as a running load check holds it
        result = invoke_cli("push", str(models["lns"]), "--repo-id", REPO_ID, "--dry-run")
        assert result.returncode == 0, result.stderr
    assert f"removed 1 scratch folder(s) that stopped runs left in '{temp}': {dead.name}" in result.stderr
    assert [path.name for path in temp.iterdir()] == [live.name]  # this push's own scratch folder is gone too


@pytest.fixture(scope="module")
def large_checkpoint(tmp_path_factory):
    """A ~300 MB Llama checkpoint of random weights in 24 shards, written straight with safetensors."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("large") / "llama-300mb"
    folder.mkdir()
    config = LlamaConfig(vocab_size=16000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=256,
                         tie_word_embeddings=False)
    config.save_pretrained(folder)
    with torch.device("meta"):
        shapes = {name: tensor.shape for name, tensor in LlamaForCausalLM(config).state_dict().items()}
    generator = torch.Generator().manual_seed(0)
    shards, current, size = [], {}, 0
    for name, shape in shapes.items():
        current[name] = torch.randn(shape, generator=generator) * 0.02
        size += current[name].numel() * 4
        if size >= 12_000_000:
            shards.append(current)
            current, size = {}, 0
    if current:
        shards.append(current)
    weight_map = {}
    for number, tensors in enumerate(shards, start=1):
        name = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        save_file(tensors, folder / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, name))
    total = sum(path.stat().st_size for path in folder.glob("*.safetensors"))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                     "weight_map": weight_map}))
    assert total > 250_000_000 and len(shards) > 10
    return folder


def _signal_mid_copy(source: Path, out: Path, signum: int) -> subprocess.CompletedProcess:
    """Start `lns-surgery convert SOURCE --out OUT --link copy` and send ``signum`` once the first
    shard is in its temporary folder (and not yet all of them)."""
    shards = len(list(source.glob("*.safetensors")))
    process = subprocess.Popen([sys.executable, "-m", "lns_surgery", "convert", str(source), "--out", str(out),
                                "--link", "copy"], cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, stdin=subprocess.DEVNULL)
    copied = 0
    deadline = time.monotonic() + 240
    while process.poll() is None and time.monotonic() < deadline:
        copied = sum(len(list(folder.glob("*.safetensors"))) for folder in out.parent.glob(f".{out.name}.lns-tmp-*"))
        if copied >= 1:
            process.send_signal(signum)
            break
        time.sleep(0.001)
    stdout, stderr = process.communicate(timeout=120)
    assert 1 <= copied < shards, f"not stopped mid-copy ({copied} of {shards} shards): {stderr[-1500:]}"
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def test_convert_killed_mid_copy_leaves_nothing_at_out_and_the_next_run_cleans_up(large_checkpoint, tmp_path):
    source_before = tree_state(large_checkpoint)
    out = tmp_path / "converted"

    # SIGTERM: the process removes its own temporary folder on the way out.
    stopped = _signal_mid_copy(large_checkpoint, out, signal.SIGTERM)
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stderr[-1500:]
    assert stopped.stderr.strip().splitlines()[-1] == "terminated"
    assert list(tmp_path.iterdir()) == []

    # SIGKILL: nothing can run, so the half-written temporary folder stays beside --out ...
    killed = _signal_mid_copy(large_checkpoint, out, signal.SIGKILL)
    assert killed.returncode == -signal.SIGKILL
    leftovers = [path.name for path in tmp_path.iterdir() if path.name != ".converted.lns-lock"]  # its lock, too
    assert len(leftovers) == 1 and leftovers[0].startswith(".converted.lns-tmp-")

    # ... until the next run beside the same --out, which removes it, says so, and succeeds.
    result = invoke_cli("convert", str(large_checkpoint), "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert f"removed 1 temporary folder(s) that stopped runs left beside '{out}': {leftovers[0]}" in result.stderr
    assert [path.name for path in tmp_path.iterdir()] == ["converted"]
    assert (out / MARKER_NAME).is_file() and (out / "modeling_lns.py").is_file()
    assert tree_state(large_checkpoint) == source_before
