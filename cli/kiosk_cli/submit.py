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

#: kiosk-client's job flags that set one job field each (its -j/--job-type is --queue, its
#: -m/--model NAME:VERSION is --model, its -b/--storage-bucket is --bucket, its --output-dir is --out).
FIELD_FLAGS: tuple[tuple[tuple[str, ...], str], ...] = (
    (("-s", "--scale"), "scale"),
    (("-l", "--label"), "label"),
    (("--pre", "--preprocess"), "preprocess_function"),
    (("--post", "--postprocess"), "postprocess_function"),
)


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


def alias_fields(args: Any) -> dict[str, str]:
    """The job fields set by kiosk-client style flags (``-s 1.2`` is ``--field scale=1.2``)."""
    values = {field: getattr(args, f"field_{field}", None) for _, field in FIELD_FLAGS}
    return {field: value for field, value in values.items() if value is not None}


def model_flags(model: str, model_name: str, model_version: str) -> tuple[str, str]:
    """(name, version) from ``--model NAME:VERSION`` or ``--model-name``/``--model-version``."""
    if not model:
        return model_name, model_version
    if model_name or model_version:
        raise CliError("--model NAME:VERSION replaces --model-name/--model-version: give one or the other")
    name, sep, version = model.partition(":")
    if not name or (sep and not version):
        raise CliError(f"--model expects NAME or NAME:VERSION, got {model!r}")
    return name, version


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
