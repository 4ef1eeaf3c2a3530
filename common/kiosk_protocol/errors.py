"""One-line errors: what a user reads in a job's reason, a status condition or a CLI message.

Job keys and fields come from a public web form: anything that writes them to a log, a
reason or a terminal goes through ``printable`` (or ``one_line``, which uses it), so a
newline cannot forge a log line, an escape sequence cannot reach a terminal, and a 20 MiB
value cannot become a 20 MiB line.
"""

from __future__ import annotations

REASON_LIMIT = 300
#: Default length of a value in a log line (job keys are ~100 characters).
LOG_LIMIT = 200

_NAMED_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


class ConfigError(ValueError):
    """A setting (an environment variable) has a value that cannot be used; one line naming it."""


def _escape(char: str) -> str:
    named = _NAMED_ESCAPES.get(char)
    if named is not None:
        return named
    code = ord(char)
    if code < 0x100:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def printable(text: object, limit: int = LOG_LIMIT) -> str:
    """``text`` safe for one log line or one terminal cell: control and other non-printable
    characters (newlines, ESC, bidi overrides...) escaped as ``\\n``, ``\\x1b``, ``\\u202e``,
    and capped at ``limit`` characters (``...`` marks a cut). Bytes are decoded leniently."""
    if isinstance(text, bytes):
        text = text[: limit * 4 + 4].decode("utf-8", "backslashreplace")
    raw = str(text)
    if len(raw) <= limit and raw.isprintable():
        return raw
    pieces: list[str] = []
    size = 0
    for char in raw[: limit + 1]:  # never escape more than can be shown
        piece = char if char.isprintable() else _escape(char)
        pieces.append(piece)
        size += len(piece)
        if size > limit:
            break
    if size <= limit and len(raw) <= limit:
        return "".join(pieces)
    while pieces and size > limit - 3:  # cut whole escapes only, then mark the cut
        size -= len(pieces.pop())
    return "".join(pieces) + "..."


def one_line(text: object, limit: int = REASON_LIMIT) -> str:
    """Collapse whitespace to a single line, escape what is left unprintable, cap its length."""
    raw = str(text)
    cut = len(raw) > 4 * limit  # whitespace collapses: keep a margin, but never split 20 MiB
    line = " ".join((raw[: 4 * limit] if cut else raw).split())
    return printable(f"{line} ...".lstrip() if cut else line, limit)


def describe(exc: BaseException, limit: int = REASON_LIMIT) -> str:
    """An exception as one line: its message, or its type when the message is empty."""
    return one_line(exc, limit) or type(exc).__name__
