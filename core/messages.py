"""One-line error messages that never echo a user's file whole.

Every message HeadLab shows (a UI error box, a CLI `error:` line, a job's error) is one line; what it
quotes from user content (a header row, a label value, a column name) is cut by `quote`.
"""

from __future__ import annotations

QUOTE_LIMIT = 80  # characters of user content a message quotes


def one_line(text: object) -> str:
    """`text` (a string or an exception) with every run of whitespace, newlines included, as one space."""
    flat = " ".join(str(text).split())
    return flat or (type(text).__name__ if isinstance(text, BaseException) else "")


def quote(text: object, limit: int = QUOTE_LIMIT) -> str:
    """User content fit to quote in a message: on one line, cut after `limit` characters.

    A cut text ends with "… (N characters)", N the length of the whole one-line text; the caller adds
    its own quotation marks. E.g. `quote("a" * 10**6)` is 80 a's then "… (1000000 characters)".
    """
    flat = one_line(text)
    return flat if len(flat) <= limit else f"{flat[:limit]}… ({len(flat)} characters)"
