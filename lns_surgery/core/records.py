"""Bounds on what one record of a data file may cost, and the check of text that is not text.

A JSON Lines or plain-text data file holds one record per line. A single line of hundreds of
megabytes (a dump pasted into one record, a binary file with a .jsonl name) makes a reader hold it
whole, several times over while it is parsed and tokenised, and can abort the process; it is refused
instead, by line number, before any of it is parsed.
"""

from __future__ import annotations

from pathlib import Path

from lns_surgery.core.errors import LNSError

MAX_RECORD_BYTES = 64 * 1024 * 1024  # one line of a .jsonl or .txt data file
_SCAN_CHUNK = 8 * 1024 * 1024

# Characters that no text holds in bulk: C0 and C1 controls (NUL, ...), DEL; not tab, newline, carriage
# return, vertical tab or form feed.
_CONTROLS = dict.fromkeys([*(c for c in range(0x20) if chr(c) not in "\t\n\r\v\f"), 0x7F, *range(0x80, 0xA0)])
MAX_CONTROL_FRACTION = 0.1


def too_large(where: str, limit: int) -> LNSError:
    size = f"{limit // (1024 * 1024)} MB" if limit >= 1024 * 1024 else f"{limit} bytes"
    return LNSError(f"{where}: the record is over {size}, the most one record may take; split it, or check that "
                    "the file holds one record per line")


def check_line_lengths(path: Path, limit: int | None = None) -> None:
    """Refuse a file with a line longer than ``limit`` bytes (``MAX_RECORD_BYTES``), naming the line;
    reads the file in chunks, so the check itself never holds a line."""
    limit = MAX_RECORD_BYTES if limit is None else limit
    line, run = 1, 0  # the current line's number, and how many of its bytes were read
    size = min(_SCAN_CHUNK, limit)  # a line that ends inside one chunk is no longer than the bound
    with open(path, "rb") as handle:
        while chunk := handle.read(size):
            first = chunk.find(b"\n")
            if first < 0:
                run += len(chunk)
            else:
                run += first
            if run > limit:
                raise too_large(f"{path}, line {line}", limit)
            if first >= 0:
                line += chunk.count(b"\n")
                run = len(chunk) - chunk.rfind(b"\n") - 1


def control_fraction(text: str) -> float:
    """The share of ``text``'s characters that are control characters (see ``_CONTROLS``)."""
    if not text:
        return 0.0
    return (len(text) - len(text.translate(_CONTROLS))) / len(text)


def check_is_text(text: str, where: str) -> None:
    """Refuse text of which more than ``MAX_CONTROL_FRACTION`` is NUL or other control characters:
    valid UTF-8, but binary data; a model would score it (a perplexity in the billions) or train on it."""
    fraction = control_fraction(text)
    if fraction > MAX_CONTROL_FRACTION:
        raise LNSError(f"{where} is not text: {fraction:.0%} of its characters are control characters such as NUL "
                       "(binary data?)")
