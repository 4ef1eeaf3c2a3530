"""`kiosk submit`: upload inputs to the bucket and enqueue Kiosk-compatible jobs."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis

import kiosk_protocol as protocol
from kiosk_cli.errors import CliError
from kiosk_protocol.errors import describe

UPLOAD_DIR = "uploads"


@dataclass(frozen=True)
class Submitted:
    key: str
    local_path: Path
    input_file_name: str


def parse_fields(pairs: Sequence[str]) -> dict[str, str]:
    """``--field name=value`` pairs -> dict; only known Kiosk fields may be set this way."""
    allowed = set(protocol.SUBMISSION_FIELDS) - {"status", "created_at", "updated_at", "input_file_name"}
    fields: dict[str, str] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        name = name.strip()
        if not sep or not name:
            raise CliError(f"--field expects name=value, got {pair!r}")
        if name not in allowed:
            choices = ", ".join(sorted(allowed))
            raise CliError(f"--field {name}: not a settable job field (choose from {choices})")
        fields[name] = value
    return fields


def submit_files(
    client: redis.Redis,
    storage: Any,
    files: Sequence[Path],
    queue: str,
    model_name: str = "",
    model_version: str = "",
    fields: Mapping[str, str] | None = None,
) -> list[Submitted]:
    """Upload each file, then write its job hash and push it (zip files go to ``{queue}-zip``)."""
    submitted = []
    for path in files:
        try:
            dest, url = storage.upload(str(path), subdir=UPLOAD_DIR)
        except Exception as exc:  # noqa: BLE001 - any backend failure becomes one line
            raise CliError(f"cannot upload {path} to the bucket: {describe(exc)}") from None
        extra = {"original_name": path.name, "url": url or "", **(fields or {})}
        try:
            key = protocol.submit_job(client, queue, dest, model_name, model_version, **extra)
        except redis.RedisError as exc:
            raise CliError(f"cannot write job for {path} to Redis: {describe(exc)}") from None
        submitted.append(Submitted(key, path, dest))
    return submitted
