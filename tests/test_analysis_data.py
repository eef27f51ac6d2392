"""Windows of token ids from text, JSON Lines, JSON and in-memory documents."""

from __future__ import annotations

import json

import pytest

from conftest import shared_path
from lns_surgery import load_tokenizer
from lns_surgery.analysis import token_windows
from lns_surgery.core.errors import LNSError


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(str(shared_path("models/stories260K")))  # BOS 1, EOS 2, not added by itself


def test_text_file_windows_start_with_bos_and_follow_the_text(tokenizer, tmp_path):
    text = "Once upon a time there was a little dog.\n\nIt liked to run in the park with its friends.\n" * 20
    path = tmp_path / "stories.txt"
    path.write_text(text)
    windows = token_windows(tokenizer, path, seq_len=16, max_tokens=64)
    assert windows.shape == (4, 16)
    assert (windows[:, 0] == tokenizer.bos_token_id).all()
    expected = tokenizer(text, add_special_tokens=False)["input_ids"][: 4 * 15]
    assert windows[:, 1:].reshape(-1).tolist() == expected
    assert tokenizer.bos_token_id not in windows[:, 1:].tolist()  # one running document: no separators


def test_large_text_file_is_read_only_as_far_as_needed_with_the_tokens_of_the_whole_text(tokenizer, tmp_path, monkeypatch):
    from lns_surgery.analysis import data

    text = "".join(f"Line {i} of the tale.\n" + ("\n" if i % 3 == 0 else "") for i in range(400))
    path = tmp_path / "tale.txt"
    path.write_text(text)
    everything = tokenizer(text, add_special_tokens=False)["input_ids"]
    monkeypatch.setattr(data, "_TEXT_MIN_CHARS", 64)
    seen = []

    class Recording:  # the real tokenizer, remembering how much text it was given
        bos_token_id, eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id

        def __call__(self, piece, **kwargs):
            seen.append(len(piece))
            return tokenizer(piece, **kwargs)

    windows = token_windows(Recording(), path, seq_len=32, max_tokens=320)
    assert windows.shape == (10, 32)
    assert windows[:, 1:].reshape(-1).tolist() == everything[: 10 * 31]
    assert max(seen) < len(text) / 2
    whole = token_windows(tokenizer, path, seq_len=32, max_tokens=10**6)
    assert whole[:, 1:].reshape(-1).tolist() == everything[: len(everything) // 31 * 31]


def test_jsonl_documents_are_separated_by_bos_and_max_tokens_bounds_the_windows(tokenizer, tmp_path):
    path = tmp_path / "docs.jsonl"
    documents = [f"Story number {i}: the cat sat on the mat and looked at the sun." for i in range(30)]
    path.write_text("\n".join(json.dumps({"text": doc, "id": i}) for i, doc in enumerate(documents)) + "\n\n")
    windows = token_windows(tokenizer, path, seq_len=20, max_tokens=100)
    assert windows.shape == (5, 20)
    stream = windows[:, 1:].reshape(-1).tolist()
    first = tokenizer(documents[0], add_special_tokens=False)["input_ids"]
    assert stream[: len(first) + 1] == first + [tokenizer.bos_token_id]


def test_json_list_gives_the_same_windows_as_jsonl(tokenizer, tmp_path):
    records = [{"body": f"Document {i} talks about rivers and mountains."} for i in range(10)]
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in records))
    (tmp_path / "b.json").write_text(json.dumps(records))
    a = token_windows(tokenizer, tmp_path / "a.jsonl", 12, 48, text_field="body")
    b = token_windows(tokenizer, tmp_path / "b.json", 12, 48, text_field="body")
    assert a.tolist() == b.tolist()
    assert token_windows(tokenizer, [r["body"] for r in records], 12, 48).tolist() == a.tolist()


def test_tokenizer_without_bos_separates_documents_with_eos(tokenizer):
    class NoBos:
        bos_token_id = None
        eos_token_id = 2

        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [ord(c) for c in text]}

    windows = token_windows(NoBos(), ["ab", "cd", "ef"], seq_len=4, max_tokens=100)
    assert windows.tolist() == [[97, 98, 2, 99], [100, 2, 101, 102]]


@pytest.mark.parametrize(
    "content, suffix, message",
    [
        ("", ".txt", "has no text"),
        ("  \n\n  ", ".txt", "has no text"),
        ("", ".jsonl", "has no text"),
        ("hello", ".txt", "fewer than one window"),
        ('{"content": "x"}\n', ".jsonl", "no 'text' field"),
        ('{"text": "x"\n', ".jsonl", "line 1: not valid JSON"),
        ("a,b\n", ".csv", "unsupported file type"),
    ],
)
def test_bad_data_is_one_readable_line(tokenizer, tmp_path, content, suffix, message):
    path = tmp_path / f"data{suffix}"
    path.write_text(content)
    with pytest.raises(LNSError, match=message) as error:
        token_windows(tokenizer, path, seq_len=64, max_tokens=1000)
    assert "\n" not in str(error.value)


def test_missing_file_and_offline_hub_dataset_are_refused(tokenizer, tmp_path):
    with pytest.raises(LNSError, match="no such data file"):
        token_windows(tokenizer, tmp_path / "missing.txt", 16, 64)
    with pytest.raises(LNSError, match="could not read 'someone/some-dataset'"):  # HF_DATASETS_OFFLINE=1
        token_windows(tokenizer, "someone/some-dataset", 16, 64)
    with pytest.raises(LNSError, match="smaller than one window"):
        token_windows(tokenizer, ["text"], 16, 8)
