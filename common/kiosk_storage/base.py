"""What every storage backend shares: errors, bucket URLs, unique names, retries.

Backends (gcs, s3, local) only say how to move bytes and how to classify their
own exceptions; this module turns that into bounded retries and one-line
errors that name the bucket, so a job's ``reason`` is readable and the
traceback stays in the log.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import BinaryIO, TypeVar
from urllib.parse import unquote, urlsplit

from kiosk_protocol.backoff import retry_call

log = logging.getLogger(__name__)

T = TypeVar("T")

SCHEMES = ("gs", "s3", "file")
# The longest expiry a V4 signature (S3 and GCS alike) accepts: 7 days.
MAX_SIGNED_URL_EXPIRY = 7 * 24 * 3600
# Cap for one backoff sleep; STORAGE_BACKOFF is the first delay.
MAX_BACKOFF = 30.0


class StorageError(Exception):
    """A storage operation failed; the message is one line naming the bucket."""


class InputNotFound(StorageError):
    """The object to download does not exist."""


class StorageUnavailable(StorageError):
    """Transient failures (5xx, connection errors) outlasted every retry."""


class StorageConfigError(StorageError):
    """The bucket URL or credentials cannot work at all."""


class InputRefused(StorageError):
    """A job names an object it may not read (outside the bucket/prefix, ``..``, a symlink)
    or one over MAX_INPUT_BYTES; the message is the job's one-line reason."""


class Fault(Enum):
    """How a backend classifies one of its exceptions."""

    MISSING = "missing"  # 404 on the object
    NO_BUCKET = "no_bucket"  # the bucket itself is absent
    DENIED = "denied"  # 401/403, bad credentials
    TRANSIENT = "transient"  # 5xx, 429, timeouts, connection refused/reset
    OTHER = "other"  # any other client error: not retried


@dataclass(frozen=True)
class Location:
    """A parsed bucket URL: scheme, bucket (the directory for file://) and key prefix."""

    scheme: str
    bucket: str
    prefix: str = ""

    @property
    def url(self) -> str:
        if self.scheme == "file":
            return f"file://{self.bucket}"
        tail = f"/{self.prefix}" if self.prefix else ""
        return f"{self.scheme}://{self.bucket}{tail}"

    def key(self, name: str) -> str:
        """The object key for a name relative to this location."""
        name = name.lstrip("/")
        return f"{self.prefix}/{name}" if self.prefix else name


def parse_bucket_url(url: str) -> Location:
    """``gs://bucket[/prefix]``, ``s3://bucket[/prefix]`` or ``file:///abs/dir`` → Location."""
    text = url.strip()
    parts = urlsplit(text)
    scheme = parts.scheme.lower()
    if scheme not in SCHEMES or "://" not in text:
        raise StorageConfigError(f"storage URL {url!r} must start with gs://, s3:// or file://")
    if scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise StorageConfigError(
                f"storage URL {url!r} must be an absolute path such as file:///data/kiosk")
        path = unquote(parts.path)
        if not path.startswith("/"):
            raise StorageConfigError(
                f"storage URL {url!r} must be an absolute path such as file:///data/kiosk")
        return Location("file", os.path.normpath(path))
    if not parts.netloc:
        raise StorageConfigError(f"storage URL {url!r} names no bucket")
    return Location(scheme, parts.netloc, parts.path.strip("/"))


_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def safe_basename(name: str) -> str:
    """The file name part, with anything but letters, digits, ``._-`` turned into ``_``."""
    base = os.path.basename(name.replace("\\", "/").rstrip("/")) or "file"
    cleaned = _UNSAFE.sub("_", base).lstrip(".")
    return cleaned[:200] or "file"


def unique_name(filename: str, subdir: str = "") -> str:
    """``[subdir/]<uuid4 hex>-<basename>``: concurrent jobs can never pick the same name."""
    name = f"{uuid.uuid4().hex}-{safe_basename(filename)}"
    subdir = subdir.strip("/")
    return f"{subdir}/{name}" if subdir else name


def short(exc: BaseException, limit: int = 200) -> str:
    """First line of an exception message, trimmed: safe to put in a job's reason."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


class Storage(ABC):
    """A bucket (or directory) the worker downloads inputs from and uploads results to.

    Names are object keys relative to the bucket URL's prefix, as the Kiosk
    writes ``input_file_name``; full ``scheme://bucket/key`` URLs are accepted only
    for the configured bucket and under its prefix (a job's fields come from a public
    form: the worker's credentials must not reach other buckets). ``..`` segments are
    refused, and so are inputs over ``max_input_bytes`` (checked before the download).
    """

    #: The backend checks ``max_input_bytes`` itself from its GET reply (no extra HEAD).
    size_on_get = False

    def __init__(
        self,
        location: Location,
        *,
        public: bool = False,
        url_expiry: int = MAX_SIGNED_URL_EXPIRY,
        max_retry: int = 5,
        backoff: float = 0.5,
        max_backoff: float = MAX_BACKOFF,
        sleep: Callable[[float], object] | None = None,
        max_input_bytes: int | None = None,
    ) -> None:
        from kiosk_protocol.settings import Settings

        self.location = location
        #: Largest object ``download`` / ``readable_path`` fetch (MAX_INPUT_BYTES); 0 = no limit.
        self.max_input_bytes = Settings.max_input_bytes if max_input_bytes is None else int(max_input_bytes)
        self.public = public
        self.url_expiry = max(1, min(int(url_expiry), MAX_SIGNED_URL_EXPIRY))
        self.attempts = max(0, int(max_retry)) + 1
        self.backoff = max(0.0, float(backoff))
        self.max_backoff = max(self.backoff, float(max_backoff))
        self._sleep = sleep

    @property
    def url(self) -> str:
        """The bucket URL (with prefix), as used in error messages."""
        return self.location.url

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r})"

    # ---- public API ------------------------------------------------------

    def download(self, path_or_url: str, dest_dir: str) -> str:
        """Fetch an object into ``dest_dir``; return the local file path."""
        bucket, key = self.resolve(path_or_url)
        os.makedirs(dest_dir, exist_ok=True)
        self.check_input_size(path_or_url, bucket, key)
        dest = os.path.join(dest_dir, safe_basename(key))
        fd, tmp = tempfile.mkstemp(dir=dest_dir, prefix=".download-")
        try:
            with os.fdopen(fd, "wb") as fh:

                def attempt() -> None:
                    fh.seek(0)
                    fh.truncate()
                    self._get_to_file(bucket, key, fh)

                self._call("download", path_or_url, bucket, attempt, reading=True)
            os.replace(tmp, dest)
        except BaseException:
            _remove_quietly(tmp)
            raise
        return dest

    def check_input_size(self, path_or_url: str, bucket: str, key: str) -> None:
        """Refuse an object over ``max_input_bytes`` from its size (HEAD / stat), before any byte
        of it is read; a missing object raises InputNotFound as a download would."""
        if self.max_input_bytes <= 0 or self.size_on_get:
            return
        size = self._call("download", path_or_url, bucket, lambda: self._size(bucket, key), reading=True)
        if size > self.max_input_bytes:
            raise self.too_big(path_or_url, size)

    def too_big(self, name: str, size: int) -> InputRefused:
        return InputRefused(f"input file {name!r} is {size} bytes, over the limit of "
                            f"{self.max_input_bytes} (MAX_INPUT_BYTES)")

    def readable_path(self, path_or_url: str, dest_dir: str) -> str:
        """A local file with the object's content, for reading only (never modify or remove it).

        A download into ``dest_dir`` here; ``file://`` storage returns the object's own
        path instead of copying it (saves a file write and delete per job).
        """
        return self.download(path_or_url, dest_dir)

    def read_bytes(self, path_or_url: str) -> bytes:
        """An object's whole content (small files: results, CLI checks)."""
        bucket, key = self.resolve(path_or_url)
        return self._call("read", path_or_url, bucket, lambda: self._get_bytes(bucket, key), reading=True)

    def upload(self, local_path: str, subdir: str = "") -> tuple[str, str]:
        """Store a local file under a fresh unique name; return ``(name, output_url)``."""
        name = unique_name(local_path, subdir)
        key = self.location.key(name)
        self._call("upload", name, self.location.bucket, lambda: self._put_file(key, local_path))
        return name, self.url_for(name)

    def upload_data(self, data: bytes, filename: str, subdir: str = "") -> tuple[str, str]:
        """Store in-memory ``data`` under a fresh unique name made from ``filename``, as
        ``upload`` does for a local file; return ``(name, output_url)``."""
        name = unique_name(filename, subdir)
        key = self.location.key(name)
        payload = bytes(data)
        self._call("upload", name, self.location.bucket, lambda: self._put_bytes(key, payload))
        return name, self.url_for(name)

    def upload_bytes(self, data: bytes, name: str) -> tuple[str, str]:
        """Store ``data`` under exactly ``name`` (relative to the prefix); return ``(name, url)``."""
        name = name.lstrip("/")
        if not name:
            raise StorageError(f"cannot upload to {self.url}: empty object name")
        key = self.location.key(name)
        self._call("upload", name, self.location.bucket, lambda: self._put_bytes(key, bytes(data)))
        return name, self.url_for(name)

    def exists(self, name: str) -> bool:
        """Whether an object (bare name or URL) exists."""
        bucket, key = self.resolve(name)
        return self._call("check", name, bucket, lambda: self._exists(bucket, key))

    def delete(self, name: str) -> None:
        """Remove an object; removing a missing one is not an error."""
        bucket, key = self.resolve(name)
        try:
            self._call("delete", name, bucket, lambda: self._delete(bucket, key), reading=True)
        except InputNotFound:
            pass

    def url_for(self, name: str) -> str:
        """A URL for a stored name: signed and time-limited by default, public if configured."""
        return self._make_url(self.location.key(name.lstrip("/")))

    def resolve(self, path_or_url: str) -> tuple[str, str]:
        """``(bucket, key)`` for a bare name (relative to the prefix) or a full URL."""
        text = path_or_url.strip()
        if not text:
            raise StorageError(f"no input file name given for {self.url}")
        if "://" not in text:
            _refuse_dot_dot(text, path_or_url)
            return self.location.bucket, self.location.key(text)
        parts = urlsplit(text)
        if parts.scheme.lower() != self.location.scheme:
            raise StorageError(f"cannot read {text!r} with {self.url} storage: scheme differs")
        key = unquote(parts.path).lstrip("/")
        if not parts.netloc or not key:
            raise StorageError(f"storage URL {text!r} names no object")
        _refuse_dot_dot(key, path_or_url)
        prefix = self.location.prefix
        if parts.netloc != self.location.bucket or (prefix and not key.startswith(prefix + "/")):
            raise InputRefused(f"storage URL {text!r} is outside {self.url}: only objects of the "
                               "configured bucket (and prefix) are read")
        return parts.netloc, key

    # ---- retries and error wording ---------------------------------------

    def _call(self, op: str, name: str, bucket: str, fn: Callable[[], T], *, reading: bool = False) -> T:
        where = self._where(bucket)

        def note(attempt: int, exc: BaseException, delay: float) -> None:
            log.warning("storage %s %r in %s failed (%s); retry %d/%d in %.2fs",
                        op, name, where, short(exc), attempt, self.attempts - 1, delay)

        kwargs = {"sleep": self._sleep} if self._sleep is not None else {}
        try:
            return retry_call(
                fn, attempts=self.attempts, base_delay=self.backoff, max_delay=self.max_backoff,
                retry_on=lambda exc: self._classify(exc) is Fault.TRANSIENT, on_retry=note, **kwargs,
            )
        except StorageError:
            raise
        except Exception as exc:
            log.debug("storage %s %r in %s failed", op, name, where, exc_info=True)
            raise self._translate(exc, op, name, where, reading) from exc

    def _translate(self, exc: Exception, op: str, name: str, where: str, reading: bool) -> StorageError:
        fault = self._classify(exc)
        if fault is Fault.MISSING and reading:
            return InputNotFound(f"input file {name!r} not found in {where}")
        if fault in (Fault.MISSING, Fault.NO_BUCKET):
            return StorageError(f"bucket {where} not found ({op} {name!r})")
        if fault is Fault.DENIED:
            return StorageError(f"access denied to {where} ({op} {name!r}): {short(exc)}")
        if fault is Fault.TRANSIENT:
            return StorageUnavailable(
                f"storage {where} unavailable after {self.attempts} attempts ({op} {name!r}): {short(exc)}")
        return StorageError(f"storage {where} failed to {op} {name!r}: {short(exc)}")

    def _where(self, bucket: str) -> str:
        if bucket == self.location.bucket:
            return self.url
        return f"{self.location.scheme}://{bucket}"

    # ---- backend hooks -----------------------------------------------------

    @abstractmethod
    def _classify(self, exc: BaseException) -> Fault:
        """Sort a backend exception into a Fault."""

    @abstractmethod
    def _get_to_file(self, bucket: str, key: str, fh: BinaryIO) -> None:
        """Write an object's bytes to ``fh`` (raise the backend's not-found error if absent)."""

    def _get_bytes(self, bucket: str, key: str) -> bytes:
        import io

        buf = io.BytesIO()
        self._get_to_file(bucket, key, buf)
        return buf.getvalue()

    @abstractmethod
    def _size(self, bucket: str, key: str) -> int:
        """The object's size in bytes, without reading it (raise the not-found error if absent)."""

    @abstractmethod
    def _put_file(self, key: str, local_path: str) -> None:
        """Store a local file under ``key`` in the configured bucket."""

    @abstractmethod
    def _put_bytes(self, key: str, data: bytes) -> None:
        """Store bytes under ``key`` in the configured bucket."""

    @abstractmethod
    def _exists(self, bucket: str, key: str) -> bool:
        """Whether the object exists."""

    @abstractmethod
    def _delete(self, bucket: str, key: str) -> None:
        """Remove the object (raise the backend's not-found error if absent)."""

    @abstractmethod
    def _make_url(self, key: str) -> str:
        """Signed (default) or public URL for a key in the configured bucket."""


def _refuse_dot_dot(key: str, shown: str) -> None:
    """Object names with ``..`` segments are refused: no backend should have to interpret them."""
    if ".." in key.replace("\\", "/").split("/"):
        raise InputRefused(f"input file name {shown!r} has a '..' segment")


def _remove_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
