"""A local directory as the bucket (``file:///abs/dir``): demos, tests, shared volumes.

Names may not escape the directory (``../`` or absolute paths outside it), and
no path component below the root may be a symlink (nor resolve outside the root),
so a job hash cannot make the worker read or overwrite arbitrary files. Writes go
to a temporary file first and are renamed into place, so readers never see a
half-written result. The output URL is the plain absolute path.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import BinaryIO
from urllib.parse import unquote, urlsplit

from kiosk_storage.base import Fault, InputRefused, Location, Storage, StorageError, _refuse_dot_dot


class LocalStorage(Storage):
    """Objects are files below ``location.bucket`` (an absolute directory)."""

    def __init__(self, location: Location, **kwargs: object) -> None:
        super().__init__(location, **kwargs)  # type: ignore[arg-type]
        self.root = location.bucket
        try:
            os.makedirs(self.root, exist_ok=True)
        except OSError as exc:
            raise StorageError(f"cannot create storage directory {self.url}: {exc.strerror}") from None

    def resolve(self, path_or_url: str) -> tuple[str, str]:
        text = path_or_url.strip()
        if not text:
            raise StorageError(f"no input file name given for {self.url}")
        _refuse_dot_dot(unquote(text), path_or_url)
        if text.startswith("file://"):
            parts = urlsplit(text)
            if parts.netloc not in ("", "localhost"):
                raise StorageError(f"file URL {text!r} must be an absolute path")
            full = os.path.normpath(unquote(parts.path))
        elif os.path.isabs(text):
            full = os.path.normpath(text)
        else:
            full = os.path.normpath(os.path.join(self.root, text))
        return self.root, self._inside(full, path_or_url)

    def _inside(self, full: str, shown: str) -> str:
        """The key of an absolute path, refusing anything outside the root directory."""
        root = os.path.normpath(self.root)
        if full == root or not full.startswith(root.rstrip("/") + "/"):
            raise InputRefused(f"file {shown!r} is outside {self.url}")
        return os.path.relpath(full, root)

    def _path(self, key: str) -> str:
        full = os.path.normpath(os.path.join(self.root, key))
        path = os.path.join(self.root, self._inside(full, key))
        self._no_links(path, key)
        return path

    def _no_links(self, path: str, shown: str) -> None:
        """Refuse a path with a symlink below the root, or one that resolves outside it."""
        root = os.path.realpath(self.root)
        current = self.root
        for part in os.path.relpath(path, self.root).split(os.sep):
            current = os.path.join(current, part)
            if os.path.islink(current):
                raise InputRefused(f"file {shown!r} in {self.url} is a symbolic link (or passes through one)")
        real = os.path.realpath(path)
        if real != root and not real.startswith(root.rstrip("/") + "/"):
            raise InputRefused(f"file {shown!r} resolves outside {self.url}")

    def _classify(self, exc: BaseException) -> Fault:
        if isinstance(exc, (FileNotFoundError, IsADirectoryError, NotADirectoryError)):
            return Fault.MISSING
        if isinstance(exc, PermissionError):
            return Fault.DENIED
        return Fault.OTHER

    def readable_path(self, path_or_url: str, dest_dir: str) -> str:
        """The object's own file: the bucket is a local directory, so nothing is copied."""
        bucket, key = self.resolve(path_or_url)
        path = self._path(key)
        self.check_input_size(path_or_url, bucket, key)

        def check() -> str:
            if not os.path.isfile(path):
                raise FileNotFoundError(path)  # classified MISSING: the usual InputNotFound
            return path

        return self._call("download", path_or_url, bucket, check, reading=True)

    def _get_to_file(self, bucket: str, key: str, fh: BinaryIO) -> None:
        with open(self._path(key), "rb") as src:
            shutil.copyfileobj(src, fh, 1 << 20)

    def _write_atomically(self, key: str, write: object) -> None:
        dest = self._path(key)
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(dest), prefix=".upload-")
        try:
            with os.fdopen(fd, "wb") as out:
                write(out)  # type: ignore[operator]
            os.replace(tmp, dest)
        except BaseException:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            raise

    def _put_file(self, key: str, local_path: str) -> None:
        def copy(out: BinaryIO) -> None:
            with open(local_path, "rb") as src:
                shutil.copyfileobj(src, out, 1 << 20)

        try:
            self._write_atomically(key, copy)
        except FileNotFoundError:
            raise StorageError(f"cannot upload {local_path!r} to {self.url}: no such local file") from None

    def _put_bytes(self, key: str, data: bytes) -> None:
        self._write_atomically(key, lambda out: out.write(data))

    def _size(self, bucket: str, key: str) -> int:
        path = self._path(key)
        if not os.path.isfile(path):
            raise FileNotFoundError(path)
        return os.stat(path).st_size

    def _exists(self, bucket: str, key: str) -> bool:
        return os.path.isfile(self._path(key))

    def _delete(self, bucket: str, key: str) -> None:
        os.unlink(self._path(key))

    def _make_url(self, key: str) -> str:
        return self._path(key)
