"""Parsers of environment-variable values: each returns the value or raises ValueError whose
message ends the one-line "invalid setting NAME=value: ..." error of load_settings."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

#: CLOUD_PROVIDER value -> bucket URL scheme.
CLOUD_PROVIDERS = {"gke": "gs", "gcp": "gs", "aws": "s3"}


def _bool(text: str) -> bool:
    low = text.strip().lower()
    if low in {"1", "true", "yes", "on"}:
        return True
    if low in {"0", "false", "no", "off", ""}:
        return False
    raise ValueError("expected true or false")


def _positive(parse: Callable[[str], T], allow_zero: bool = False) -> Callable[[str], T]:
    def check(text: str) -> T:
        value = parse(text)
        if value < 0 or (value == 0 and not allow_zero):  # type: ignore[operator]
            raise ValueError("must be " + ("zero or more" if allow_zero else "greater than zero"))
        return value

    return check


def _port(text: str) -> int:
    value = int(text)
    if not 0 < value < 65536:
        raise ValueError("must be a port number between 1 and 65535")
    return value


def _bucket(text: str) -> str:
    text = text.strip()
    if text and not text.startswith(("gs://", "s3://", "file://")):
        raise ValueError("must start with gs://, s3:// or file://")
    return text.rstrip("/") if text not in ("file://",) else text


def _provider(text: str) -> str:
    if text.strip().lower() not in CLOUD_PROVIDERS:
        raise ValueError("must be one of " + ", ".join(sorted(CLOUD_PROVIDERS)))
    return text.strip().lower()


def _nonempty(text: str) -> str:
    if not text.strip():
        raise ValueError("must not be empty")
    return text.strip()


def _bucket_name(text: str) -> str:
    """A bare bucket name (seed-era GKE_BUCKET / AWS_S3_BUCKET); empty means unset."""
    text = text.strip().rstrip("/")
    if "://" in text:
        raise ValueError("must be a bucket name without a scheme (URLs go in STORAGE_BUCKET)")
    return text


def _model_ref(text: str) -> str:
    """A Kiosk model reference, ``Name:version`` with a whole-number version."""
    name, sep, version = text.strip().partition(":")
    if not sep or not name.strip() or not version.strip().isdigit() or ":" in version:
        raise ValueError("must be Name:version with a whole-number version, e.g. NuclearSegmentation:6")
    return f"{name.strip()}:{int(version)}"


def _optional_model_ref(text: str) -> str:
    return _model_ref(text) if text.strip() else ""


def _finite(parse: Callable[[str], float]) -> Callable[[str], float]:
    def check(text: str) -> float:
        value = parse(text)
        if value != value or value in (float("inf"), float("-inf")):
            raise ValueError("must be a finite number")
        return value

    return check


def _pp_number(minimum: float | None = None) -> Callable[[str], float]:
    def parse(text: str) -> float:
        value = float(text)
        if value != value or value in (float("inf"), float("-inf")):
            raise ValueError("must be a finite number")
        if minimum is not None and value < minimum:
            raise ValueError("must be zero or more")
        return value

    return parse


_APPLICATIONS = {"auto", "nuclear", "cytoplasm", "mesmer", "none"}


def _application_models(text: str) -> str:
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, family = part.partition("=")
        if not sep or not name.strip() or family.strip().lower() not in _APPLICATIONS - {"auto"}:
            raise ValueError(f"entry {part!r} must be ModelName=family (nuclear, cytoplasm, mesmer, none)")
    return text.strip()


def _choice(value: str, allowed: set[str]) -> str:
    if value not in allowed:
        raise ValueError("must be one of " + ", ".join(sorted(allowed)))
    return value
