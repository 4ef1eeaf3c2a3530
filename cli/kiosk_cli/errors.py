"""The one exception type the CLI turns into a one-line message and exit code 1."""

from __future__ import annotations


class CliError(Exception):
    """A user-facing failure; str(exc) is the whole message."""
