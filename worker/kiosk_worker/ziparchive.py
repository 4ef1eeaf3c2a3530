"""Zip archives of zip jobs: safe extraction of the upload and packing of the results.

Upstream extracted archives with no limits and trusted member names. Here an
archive is checked twice: first from its central directory (member count,
declared sizes, names, symlinks) before a byte is written, then while each
member streams out, counting real bytes, because declared sizes can lie.
Everything except ``extract_archive`` and ``pack_results`` is pure. The parent/child
bookkeeping on the wire is kiosk_protocol.zipjobs.
"""

from __future__ import annotations

import os
import posixpath
import re
import stat
import zipfile
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from kiosk_protocol import zipjobs
from kiosk_worker.errors import JobError

__all__ = [
    "ZipLimits",
    "ZipRejected",
    "extract_archive",
    "member_target",
    "pack_results",
    "plan_members",
    "result_folder",
]

_CHUNK = 1 << 16
#: A Windows drive: ``C:/...`` or a bare ``C:``. ``C:x.png`` and ``x:y.png`` are ordinary
#: relative names on POSIX, where members are extracted.
_DRIVE = re.compile(r"[A-Za-z]:(/|$)")

class ZipRejected(JobError):
    """The archive is unsafe or unusable; the message is the user-facing one-line reason."""


@dataclass(frozen=True)
class ZipLimits:
    """MAX_ZIP_MEMBERS and MAX_ZIP_BYTES (total uncompressed size of the extracted files)."""

    max_members: int = 1000
    max_bytes: int = 2 * 1024 * 1024 * 1024


# --- member checks ----------------------------------------------------------------------------


def _is_symlink(info: zipfile.ZipInfo) -> bool:
    mode = info.external_attr >> 16
    return info.create_system == 3 and stat.S_ISLNK(mode)


def member_target(name: str) -> str | None:
    """Safe relative POSIX path for a member, None to skip it silently.

    Skipped: directories, hidden files or folders (``.x``), macOS resource forks
    (``__MACOSX/``). Rejected (ZipRejected): absolute paths (``/x``, ``//host/x``), drive
    letters (``C:/x``, ``C:``) and anything that climbs out with ``..``. A colon elsewhere
    (``x:y.png``, ``C:x.png``) is part of a relative POSIX name and kept.
    """
    raw = name.replace("\\", "/")
    if raw.endswith("/"):
        return None
    if raw.startswith("/") or _DRIVE.match(raw):
        raise ZipRejected(f"zip entry '{_short(name)}' has an absolute path")
    parts = [p for p in raw.split("/") if p not in ("", ".")]
    if any(p == ".." for p in parts):
        raise ZipRejected(f"zip entry '{_short(name)}' points outside the archive directory")
    if not parts:
        return None
    if parts[0] == "__MACOSX" or any(p.startswith(".") for p in parts):
        return None
    if any(ord(c) < 32 for c in raw):
        raise ZipRejected(f"zip entry '{_short(name)}' has control characters in its name")
    return posixpath.join(*parts)


def plan_members(infos: Iterable[zipfile.ZipInfo], limits: ZipLimits) -> list[tuple[zipfile.ZipInfo, str]]:
    """Members to extract with their target paths, checked from the central directory alone."""
    plan: list[tuple[zipfile.ZipInfo, str]] = []
    seen: set[str] = set()
    declared = 0
    for info in infos:
        if _is_symlink(info):
            raise ZipRejected(f"zip entry '{_short(info.filename)}' is a symbolic link")
        target = member_target(info.filename)
        if target is None or info.is_dir():
            continue
        if zipjobs.separator_in(target):
            raise ZipRejected(f"zip entry '{_short(target)}' has a '{zipjobs.KEY_SEPARATOR}' in its name, "
                              "which zip jobs do not allow (it separates child job keys)")
        if target in seen:
            raise ZipRejected(f"zip entry '{_short(target)}' appears more than once")
        seen.add(target)
        plan.append((info, target))
        declared += info.file_size
        if len(plan) > limits.max_members:
            raise ZipRejected(f"zip archive has more than {limits.max_members} files (MAX_ZIP_MEMBERS)")
        if declared > limits.max_bytes:
            raise ZipRejected(
                f"zip archive would expand to more than {_size(limits.max_bytes)} (MAX_ZIP_BYTES)"
            )
    if not plan:
        raise ZipRejected("zip archive contains no files")
    folders: set[str] = set()
    for _, target in plan:
        parent = posixpath.dirname(target)
        while parent and parent not in folders:
            folders.add(parent)
            parent = posixpath.dirname(parent)
    for _, target in plan:
        if target in folders:
            raise ZipRejected(f"zip entry '{_short(target)}' is both a file and a folder")
    return plan


def extract_archive(archive: str | os.PathLike[str], dest: str | os.PathLike[str],
                    limits: ZipLimits) -> list[str]:
    """Extract the files of ``archive`` under ``dest``; returns their relative paths.

    Streams each member and stops as soon as it writes more than it declared or
    the total passes ``limits.max_bytes``, so a lying header cannot fill the disk.
    """
    dest_dir = Path(dest).resolve()
    try:
        zf = zipfile.ZipFile(archive)
    except zipfile.BadZipFile:
        raise ZipRejected("input file is not a valid zip archive") from None
    written: list[str] = []
    total = 0
    with zf:
        for info, target in plan_members(zf.infolist(), limits):
            out = (dest_dir / target).resolve()
            if not out.is_relative_to(dest_dir):
                raise ZipRejected(f"zip entry '{_short(info.filename)}' points outside the archive directory")
            out.parent.mkdir(parents=True, exist_ok=True)
            size = 0
            try:
                with zf.open(info) as src, open(out, "wb") as dst:
                    while chunk := src.read(_CHUNK):
                        size += len(chunk)
                        total += len(chunk)
                        if size > info.file_size:
                            raise ZipRejected(
                                f"zip entry '{_short(target)}' is larger than its header says"
                            )
                        if total > limits.max_bytes:
                            raise ZipRejected(
                                f"zip archive would expand to more than {_size(limits.max_bytes)} "
                                "(MAX_ZIP_BYTES)"
                            )
                        dst.write(chunk)
            except (zipfile.BadZipFile, zlib.error, EOFError):
                raise ZipRejected(f"zip entry '{_short(target)}' is corrupt") from None
            except NotImplementedError:
                raise ZipRejected(f"zip entry '{_short(target)}' uses an unsupported compression") from None
            except RuntimeError:  # encrypted member without a password
                raise ZipRejected(f"zip entry '{_short(target)}' is encrypted") from None
            written.append(target)
    return written


# --- children ---------------------------------------------------------------------------------


def result_folder(member_path: str) -> str:
    """Folder of one child's results inside the combined zip: the member path without extension."""
    stem, _ = posixpath.splitext(member_path)
    return stem or member_path


def pack_results(results: Iterable[tuple[str, str | os.PathLike[str]]],
                 archive: str | os.PathLike[str]) -> int:
    """Write one zip from ``(member_path, local result file)`` pairs; returns the entry count.

    A child's result zip is unpacked into ``{member stem}/``; any other file lands
    there as is, so two children never collide.
    """
    count = 0
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_DEFLATED, allowZip64=True) as out:
        for member_path, local in results:
            folder = result_folder(member_path)
            if zipfile.is_zipfile(local):
                with zipfile.ZipFile(local) as inner:
                    for info in inner.infolist():
                        try:
                            target = member_target(info.filename)
                        except ZipRejected:
                            target = None
                        if target is None:
                            continue
                        out.writestr(posixpath.join(folder, target), inner.read(info))
                        count += 1
            else:
                out.write(local, arcname=posixpath.join(folder, os.path.basename(str(local))))
                count += 1
    return count


def _short(name: str, limit: int = 80) -> str:
    name = "".join(c if c.isprintable() else "?" for c in name)
    return name if len(name) <= limit else name[: limit - 3] + "..."


def _size(n: int) -> str:
    """Human size for messages: 2 GiB, 512 MiB, 100 bytes."""
    value = float(n)
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{int(n)} bytes" if unit == "bytes" else f"{value:.3g} {unit}"
        value /= 1024
    return f"{n} bytes"
