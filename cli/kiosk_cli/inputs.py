"""Turn FILE|DIR arguments into the list of files to submit (pure apart from reading the tree)."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from kiosk_cli.errors import CliError


def expand_inputs(paths: Iterable[str]) -> list[Path]:
    """Files as given, directories walked recursively (hidden entries skipped), no duplicates.

    Order is stable: arguments in the order given, directory contents sorted.
    """
    found: dict[Path, None] = {}
    for raw in paths:
        path = Path(raw)
        if path.is_file():
            found.setdefault(path, None)
        elif path.is_dir():
            for child in sorted(path.rglob("*")):
                rel = child.relative_to(path)
                if child.is_file() and not any(part.startswith(".") for part in rel.parts):
                    found.setdefault(child, None)
        elif path.exists():
            raise CliError(f"not a regular file or directory: {raw}")
        else:
            raise CliError(f"no such file or directory: {raw}")
    if not found:
        raise CliError("nothing to submit: the given directories contain no files")
    return list(found)
