"""Fetch a finished job's output from the bucket."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from kiosk_cli.errors import CliError
from kiosk_protocol.errors import describe


def output_location(fields: Mapping[str, str]) -> str:
    """Where the result lives: the bucket path when known (robust), else the URL."""
    return fields.get("output_file_name") or fields.get("output_url") or ""


def download_output(storage: Any, key: str, fields: Mapping[str, str], out_dir: Path) -> str:
    """Download one job's result into out_dir; returns the local path."""
    where = output_location(fields)
    if not where:
        raise CliError(f"job {key} has no output to fetch (status {fields.get('status') or 'unknown'})")
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        return str(storage.download(where, str(out_dir)))
    except Exception as exc:  # noqa: BLE001 - any backend failure becomes one line
        raise CliError(f"cannot download {where} for job {key}: {describe(exc)}") from None


def previews(storage: Any, key: str, fields: Mapping[str, str], result: Path, out_dir: Path) -> list[Path]:
    """Overlay PNGs for a downloaded result (the input is fetched from the bucket alongside)."""
    from kiosk_cli import preview

    preview.check_installed()
    source = fields.get("input_file_name", "")
    input_path = None
    if source and not source.lower().endswith(".zip"):  # a zip job's members are previewed without input
        input_dir = out_dir / ".kiosk-inputs"
        input_dir.mkdir(parents=True, exist_ok=True)
        try:
            input_path = Path(storage.download(source, str(input_dir)))
        except Exception as exc:  # noqa: BLE001 - any backend failure becomes one line
            raise CliError(f"cannot download the input {source} of job {key}: {describe(exc)}") from None
    try:
        return preview.write_previews(result, input_path, out_dir)
    finally:
        if input_path is not None:
            input_path.unlink(missing_ok=True)
