"""Evaluation text for the depth diagnostics: documents in, fixed-length windows of token ids out.

A data source is one of

- a local ``.txt`` / ``.text`` / ``.md`` file: running text, read as one document (only as far
  as ``max_tokens`` needs, so a large file costs nothing more);
- a local ``.jsonl`` file (one JSON record per line) or ``.json`` file (a list of records), one
  document per record, taken from the record's ``text_field`` (default ``text``);
- a Hugging Face Hub dataset, ``name`` or ``name:config`` (e.g. ``wikitext:wikitext-103-raw-v1``),
  streamed from ``split``;
- in Python, also a list of strings.

Documents are tokenised without the tokenizer's own special tokens and joined into one stream,
separated by BOS when the tokenizer has one, otherwise by EOS when it has one. The stream is cut
into windows of ``seq_len`` tokens; when the tokenizer has a BOS token every window starts with it
(so the first position always sees what the model saw in training) and holds ``seq_len - 1``
tokens of the stream. Windows never overlap; the remainder is dropped.
``max_tokens`` bounds the total number of tokens in the windows.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterable, Iterator
from pathlib import Path

from lns_surgery.core.errors import LNSError, first_line
from lns_surgery.core.records import MAX_RECORD_BYTES, check_is_text, too_large
from lns_surgery.core.sources import is_hub_id

TEXT_SUFFIXES = (".txt", ".text", ".md")
RECORD_SUFFIXES = (".jsonl", ".json")
_TEXT_MIN_CHARS = 1 << 16  # the first read of a plain-text file, in characters
# The most characters read from a plain-text file per token wanted. Text averages about 4 characters a
# token; runs of spaces, digits or symbols can take more, rarely 16. Without it, a file with no line
# break would be read, and tokenised, whole.
_CHARS_PER_TOKEN = 16


def describe_source(source) -> str:
    """How a data source is named in the report."""
    if isinstance(source, (str, Path)):
        return str(source)
    return f"{len(source)} documents given in memory" if hasattr(source, "__len__") else "documents given in memory"


def _not_text(path: Path, exc: UnicodeDecodeError) -> LNSError:
    # Read leniently, a binary file would give a perplexity in the millions with no word of why.
    return LNSError(f"'{path}' is not UTF-8 text (undecodable byte {exc.object[exc.start:exc.start + 1]!r}): "
                    "is it a binary file?")


def _text_file_tokens(tokenizer, path: Path, wanted: int) -> list[int]:
    """The first ``wanted`` tokens of a text file (all of them if it has fewer), reading only a
    prefix of it. The prefix is cut at a line break (else at a space) and doubled until it gives
    enough tokens, so the tokens are those of the whole text (a tokenizer may treat the start of a
    piece differently, so pieces are never tokenised separately). It never grows beyond
    ``_CHARS_PER_TOKEN`` characters per token wanted: text that gives fewer tokens than that is
    tokenised as far as the bound reaches, and gives fewer windows."""
    limit = max(_TEXT_MIN_CHARS, _CHARS_PER_TOKEN * (wanted + 1))
    budget = min(max(_TEXT_MIN_CHARS, 8 * wanted), limit)
    text = ""
    with open(path, encoding="utf-8", errors="strict") as handle:
        while True:
            try:
                text += handle.read(budget - len(text))
            except UnicodeDecodeError as exc:
                raise _not_text(path, exc) from None
            check_is_text(text, f"'{path}'")
            if len(text) < budget:  # the whole file is read
                return tokenizer(text, add_special_tokens=False)["input_ids"] if text.strip() else []
            cut = text.rfind("\n")
            if cut < len(text) // 2:  # no line break in the second half: cut at the last space instead
                cut = max(cut, text.rfind(" "), text.rfind("\t"))
            if cut > 0:
                ids = tokenizer(text[:cut], add_special_tokens=False)["input_ids"]
                if len(ids) > wanted:  # one spare: the last token before the cut may differ
                    return ids[:wanted]
            if budget >= limit:  # as much text as --max-tokens allows is read: it gives what it gives
                piece = text[:cut] if cut > 0 else text
                return tokenizer(piece, add_special_tokens=False)["input_ids"][:wanted] if piece.strip() else []
            budget = min(2 * budget, limit)


def _record_text(record, where: str, text_field: str) -> str:
    if isinstance(record, str):
        return record
    if not isinstance(record, dict):
        raise LNSError(f"{where} is not a JSON object or string")
    if text_field not in record:
        fields = ", ".join(sorted(map(str, record))) or "none"
        raise LNSError(f"{where} has no '{text_field}' field (fields: {fields}); choose one with --text-field")
    value = record[text_field]
    if not isinstance(value, str):
        raise LNSError(f"{where}: '{text_field}' is not a string")
    return value


def _jsonl_documents(path: Path, text_field: str) -> Iterator[str]:
    # A line is read up to the record bound, never further: one huge line must not be held whole.
    with open(path, encoding="utf-8", errors="strict") as handle:
        for number in itertools.count(1):
            try:
                line = handle.readline(MAX_RECORD_BYTES + 1)
            except UnicodeDecodeError as exc:
                raise _not_text(path, exc) from None
            if not line:
                return
            if len(line) > MAX_RECORD_BYTES:  # characters: at least as many bytes
                raise too_large(f"{path}, line {number}", MAX_RECORD_BYTES)
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise LNSError(f"{path}, line {number}: not valid JSON ({exc.msg})") from None
            yield _record_text(record, f"{path}, line {number}", text_field)


def _json_documents(path: Path, text_field: str) -> Iterator[str]:
    try:
        document = json.loads(path.read_text(encoding="utf-8", errors="strict") or "[]")
    except UnicodeDecodeError as exc:
        raise _not_text(path, exc) from None
    except json.JSONDecodeError as exc:
        raise LNSError(f"{path} is not valid JSON ({exc.msg} at line {exc.lineno}); for one record per line use .jsonl") from None
    if isinstance(document, dict) and isinstance(document.get("data"), list):
        document = document["data"]
    if not isinstance(document, list):
        raise LNSError(f"{path} must hold a list of records")
    for number, record in enumerate(document):
        yield _record_text(record, f"{path}, record {number}", text_field)


def _hub_documents(name: str, split: str, text_field: str) -> Iterator[str]:
    from datasets import load_dataset

    repo, _, config = name.partition(":")
    try:
        dataset = load_dataset(repo, config or None, split=split, streaming=True)
        for number, record in enumerate(dataset):
            yield _record_text(record, f"dataset '{name}' ({split}), record {number}", text_field)
    except LNSError:
        raise
    except Exception as exc:  # datasets raises many kinds: offline, missing split, missing config, ...
        raise LNSError(f"could not read '{name}' as a local file or a Hub dataset (split '{split}'): {first_line(exc)}") from None


def iter_documents(source, *, text_field: str = "text", split: str = "validation") -> Iterator[str]:
    """The documents of a data source (see the module docstring), lazily."""
    if not isinstance(source, (str, Path)):
        if isinstance(source, Iterable):
            for number, text in enumerate(source):
                if not isinstance(text, str):
                    raise LNSError(f"document {number} is a {type(text).__name__}, not a string")
                yield text
            return
        raise LNSError(f"unsupported data source of type {type(source).__name__}")
    path = Path(source).expanduser()
    if path.is_dir():
        raise LNSError(f"'{source}' is a folder; give a .txt, .jsonl or .json file or a Hub dataset name")
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix in TEXT_SUFFIXES:
            try:
                text = path.read_text(encoding="utf-8", errors="strict")
            except UnicodeDecodeError as exc:
                raise _not_text(path, exc) from None
            check_is_text(text, f"'{path}'")
            yield text
        elif suffix == ".jsonl":
            yield from _jsonl_documents(path, text_field)
        elif suffix == ".json":
            yield from _json_documents(path, text_field)
        else:
            raise LNSError(f"'{source}': unsupported file type '{suffix}'; use {', '.join(TEXT_SUFFIXES + RECORD_SUFFIXES)}")
        return
    text = str(source)
    if text.lower().endswith(TEXT_SUFFIXES + RECORD_SUFFIXES) or not is_hub_id(text.partition(":")[0]):
        raise LNSError(f"no such data file: '{source}'")
    yield from _hub_documents(text, split, text_field)


def token_windows(
    tokenizer,
    source,
    seq_len: int,
    max_tokens: int,
    *,
    text_field: str = "text",
    split: str = "validation",
):
    """A ``[windows, seq_len]`` LongTensor of token ids from ``source`` (see the module docstring)."""
    import torch

    if seq_len < 2:
        raise LNSError("--seq-len must be at least 2 (a window needs a token to predict)")
    if max_tokens < seq_len:
        raise LNSError(f"--max-tokens ({max_tokens}) is smaller than one window of --seq-len ({seq_len})")
    bos = tokenizer.bos_token_id
    eos = tokenizer.eos_token_id
    per_window = seq_len - 1 if bos is not None else seq_len
    max_windows = max_tokens // seq_len
    wanted = max_windows * per_window

    separator = bos if bos is not None else eos  # between documents: BOS before the next, else EOS after the last
    stream: list[int] = []
    saw_text = False
    path = Path(source).expanduser() if isinstance(source, (str, Path)) else None
    if path is not None and path.is_file() and path.suffix.lower() in TEXT_SUFFIXES:
        stream = _text_file_tokens(tokenizer, path, wanted)  # one running document, read only as far as needed
        saw_text = bool(stream)
    else:
        for number, document in enumerate(iter_documents(source, text_field=text_field, split=split)):
            if not document.strip():
                continue
            check_is_text(document, f"document {number} of '{describe_source(source)}'")
            saw_text = True
            if stream and separator is not None:
                stream.append(separator)
            stream.extend(tokenizer(document, add_special_tokens=False)["input_ids"])
            if len(stream) >= wanted:
                break
    if not saw_text:
        raise LNSError(f"'{describe_source(source)}' has no text")
    windows = min(max_windows, len(stream) // per_window)
    if windows == 0:
        raise LNSError(
            f"'{describe_source(source)}' gives {len(stream)} tokens, fewer than one window of {seq_len}; lower --seq-len"
        )
    body = torch.tensor(stream[: windows * per_window], dtype=torch.long).view(windows, per_window)
    if bos is not None:
        body = torch.cat([torch.full((windows, 1), bos, dtype=torch.long), body], dim=1)
    return body
