"""Input that would cost unbounded memory, or is not what it claims to be, is read within bounds or
refused in one line: text without line breaks, one huge JSON Lines record, binary data that happens
to be valid UTF-8, YAML that sets a key twice."""

from __future__ import annotations

import json

import pytest
from conftest import shared_path

from lns_surgery import load_tokenizer
from lns_surgery.analysis import data as analysis_data
from lns_surgery.analysis import token_windows
from lns_surgery.core import records
from lns_surgery.core.errors import LNSError


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(str(shared_path("models/stories260K")))


class _Spy:
    """The tokenizer, noting the length of every text it is given."""

    def __init__(self, tokenizer):
        self.tokenizer, self.lengths = tokenizer, []
        self.bos_token_id, self.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id

    def __call__(self, text, **kwargs):
        self.lengths.append(len(text))
        return self.tokenizer(text, **kwargs)


def test_text_without_line_breaks_is_read_only_as_far_as_max_tokens_allows(tokenizer, tmp_path):
    path = tmp_path / "one-line.txt"
    word = "the little girl found a ball "
    path.write_text("A title\n" + word * (20_000_000 // len(word)))  # 20 MB, one line break at the start
    spy = _Spy(tokenizer)
    windows = token_windows(spy, path, seq_len=32, max_tokens=1024)
    assert windows.shape == (32, 32)
    assert max(spy.lengths) <= max(analysis_data._TEXT_MIN_CHARS, analysis_data._CHARS_PER_TOKEN * (32 * 31 + 1))
    # The tokens are those of the text's start, cut at a space.
    expected = tokenizer("A title\n" + word * 200, add_special_tokens=False)["input_ids"][: 32 * 31]
    assert windows[:, 1:].reshape(-1).tolist() == expected


def test_text_that_gives_few_tokens_per_character_stops_at_the_bound(tokenizer, tmp_path):
    """Characters the tokenizer folds into few tokens: the bound on characters stops the reading, and
    the text gives the windows it can."""
    path = tmp_path / "blank.txt"
    path.write_text("a" + " " * 5_000_000 + "b")
    spy = _Spy(tokenizer)
    try:
        token_windows(spy, path, seq_len=16, max_tokens=64)
    except LNSError as exc:  # fewer tokens than one window: said in one line
        assert "fewer than one window" in str(exc)
    assert max(spy.lengths) <= max(analysis_data._TEXT_MIN_CHARS, analysis_data._CHARS_PER_TOKEN * (4 * 15 + 1))


@pytest.mark.parametrize("content", ["\x00" * 1_000_000, "text\x00\x01\x02\x03\x04\x05\x06\x07 " * 1000])
def test_text_of_control_characters_is_refused_as_not_text(tokenizer, tmp_path, content):
    path = tmp_path / "zeros.txt"
    path.write_text(content)
    with pytest.raises(LNSError, match="is not text: .* control characters such as NUL"):
        token_windows(tokenizer, path, seq_len=16, max_tokens=64)
    with pytest.raises(LNSError, match="is not text"):
        token_windows(tokenizer, [content], seq_len=16, max_tokens=64)
    jsonl = tmp_path / "zeros.jsonl"
    jsonl.write_text(json.dumps({"text": content}) + "\n")
    with pytest.raises(LNSError, match="document 0 of .* is not text"):
        token_windows(tokenizer, jsonl, seq_len=16, max_tokens=64)


def test_ordinary_text_is_text():
    assert records.control_fraction("Tabs\tand\nnew lines\r\n are text.\f") == 0.0


def test_a_jsonl_record_over_the_bound_is_refused_by_line_number(tokenizer, tmp_path, monkeypatch):
    monkeypatch.setattr(analysis_data, "MAX_RECORD_BYTES", 1000)
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps({"text": "short"}) + "\n" + json.dumps({"text": "x" * 2000}) + "\n")
    with pytest.raises(LNSError, match=r"data.jsonl, line 2: the record is over"):
        token_windows(tokenizer, path, seq_len=4, max_tokens=100_000)


@pytest.mark.parametrize("lines, long_line", [
    ([10, 10, 3000, 10], 3),
    ([3000], 1),
    ([10] * 500 + [2500], 501),
])
def test_the_line_scan_names_the_first_line_over_the_bound(tmp_path, lines, long_line, monkeypatch):
    monkeypatch.setattr(records, "_SCAN_CHUNK", 700)  # lines across chunk boundaries
    path = tmp_path / "data.jsonl"
    path.write_bytes(b"".join(b"y" * length + b"\n" for length in lines))
    with pytest.raises(LNSError, match=rf"data.jsonl, line {long_line}: the record is over"):
        records.check_line_lengths(path, limit=2048)
    path.write_bytes(b"".join(b"y" * min(length, 2048) + b"\n" for length in lines))
    records.check_line_lengths(path, limit=2048)


def test_training_data_with_a_record_over_the_bound_is_refused_before_it_is_read(tmp_path, monkeypatch):
    from lns_surgery.training.data import load_split

    monkeypatch.setattr(records, "MAX_RECORD_BYTES", 1000)
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps({"text": "fine"}) + "\n" + json.dumps({"text": "x" * 5000}) + "\n")
    for streaming in (False, True):
        with pytest.raises(LNSError, match="train.jsonl, line 2: the record is over"):
            load_split(str(path), None, "train", streaming)


# --- YAML ------------------------------------------------------------------------------------------


def test_yaml_with_a_repeated_key_is_refused_with_both_lines():
    import yaml

    from lns_surgery.core.errors import first_line
    from lns_surgery.core.yaml import safe_load

    assert safe_load("a: 1\nb:\n  c: [1, 2]\n") == {"a": 1, "b": {"c": [1, 2]}}
    assert safe_load("base: &b {x: 1}\nchild:\n  <<: *b\n  x: 2\n") == {"base": {"x": 1}, "child": {"x": 2}}
    for text, line in (("learning_rate: 1e-4\nmax_steps: 5\nlearning_rate: 1e-3\n", "lines 1 and 3"),
                       ("peft:\n  r: 8\n  r: 16\n", "lines 2 and 3")):
        with pytest.raises(yaml.YAMLError) as error:
            safe_load(text)
        assert "appears twice" in first_line(error.value) and line in first_line(error.value)
