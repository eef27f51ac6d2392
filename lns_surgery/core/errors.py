"""Errors a user can cause. The CLI prints them as one line and exits non-zero; the Python API raises them."""


class LNSError(Exception):
    """A problem with the user's input or environment, stated in one readable line."""

    exit_code = 2


def first_line(exc: BaseException) -> str:
    """What went wrong in ``exc``, in one line, to quote inside an LNSError.

    A heading line that ends in ':' takes the line after it too (pydantic-style "Validation error for
    field 'x':" on its own says nothing); a KeyError is its key, without repr quotes; an exception
    without a message is its type's name.
    """
    text = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
    lines = [line.strip() for line in str(text).strip().splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    if lines[0].endswith(":") and len(lines) > 1:
        return f"{lines[0]} {lines[1]}"
    return lines[0]
