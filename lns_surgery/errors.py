"""Errors a user can cause. The CLI prints them as one line and exits non-zero; the Python API raises them."""


class LNSError(Exception):
    """A problem with the user's input or environment, stated in one readable line."""

    exit_code = 2
