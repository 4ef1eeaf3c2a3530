"""Storage backends for job inputs and results: ``gs://``, ``s3://`` and ``file://``.

``get_storage(settings)`` picks the backend from ``settings.bucket_url`` (which
already resolves the Kiosk's CLOUD_PROVIDER + GCLOUD_STORAGE_BUCKET style). The
cloud libraries are imported only for the backend in use, so a worker on
local storage does not pay their import time at every cold start.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from kiosk_storage.base import (
    MAX_SIGNED_URL_EXPIRY,
    InputNotFound,
    InputRefused,
    Location,
    Storage,
    StorageConfigError,
    StorageError,
    StorageUnavailable,
    parse_bucket_url,
    safe_basename,
    unique_name,
)

if TYPE_CHECKING:
    from kiosk_protocol.settings import Settings

__all__ = [
    "MAX_SIGNED_URL_EXPIRY", "InputNotFound", "InputRefused", "Location", "Storage", "StorageConfigError",
    "StorageError", "StorageUnavailable", "get_storage", "open_storage", "parse_bucket_url",
    "safe_basename", "unique_name",
]


def open_storage(
    bucket_url: str,
    *,
    endpoint: str = "",
    public: bool = False,
    url_expiry: int = MAX_SIGNED_URL_EXPIRY,
    max_retry: int = 5,
    backoff: float = 0.5,
    **extra: Any,
) -> Storage:
    """The backend for a bucket URL, with explicit options (the CLI and tests use this)."""
    location = parse_bucket_url(bucket_url)
    common: dict[str, Any] = dict(public=public, url_expiry=url_expiry, max_retry=max_retry,
                                  backoff=backoff, **extra)
    if location.scheme == "file":
        from kiosk_storage.local import LocalStorage

        return LocalStorage(location, **common)
    if location.scheme == "s3":
        from kiosk_storage.s3 import S3Storage

        return S3Storage(location, endpoint=endpoint, **common)
    from kiosk_storage.gcs import GCSStorage

    return GCSStorage(location, endpoint=endpoint, **common)


def get_storage(settings: Settings) -> Storage:
    """The backend named by the worker's settings (STORAGE_BUCKET or CLOUD_PROVIDER + bucket)."""
    return open_storage(
        settings.bucket_url,
        endpoint=settings.storage_endpoint,
        public=settings.storage_public,
        url_expiry=settings.signed_url_expiry,
        max_retry=settings.storage_max_retry,
        backoff=settings.storage_backoff,
        max_backoff=settings.storage_max_backoff,
        max_input_bytes=settings.max_input_bytes,
    )
