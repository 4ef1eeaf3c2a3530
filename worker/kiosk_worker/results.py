"""Write results: label images as TIFF, bundled into one zip per job.

Local names only need to be unique inside the job's own temp dir; the
uploaded name is made unique by the storage backend (uuid prefix), so
concurrent jobs with the same input name never collide.
"""

from __future__ import annotations

import io
import os
import re
import zipfile
from collections.abc import Iterable, Mapping
from typing import BinaryIO

import numpy as np

__all__ = ["label_members", "result_stem", "save_arrays", "save_labels", "tiff_bytes", "zip_arrays", "zip_arrays_bytes",
           "zip_files"]

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
#: Deflate level of result zips.
ZIP_LEVEL = 1


def result_stem(input_file_name: str, fallback: str = "image") -> str:
    """A safe base name for results from the input file's name (no extension)."""
    base = os.path.basename(str(input_file_name).replace("\\", "/").rstrip("/"))
    stem = os.path.splitext(base)[0]
    stem = _UNSAFE.sub("_", stem).strip("._")
    return stem[:120] or fallback


def save_labels(labels: np.ndarray, out_dir: str, stem: str) -> list[str]:
    """(N, H, W) or (H, W) int labels -> ``{stem}_labels.tif`` (one frame) or one per frame."""
    import tifffile

    arr = np.asarray(labels)
    if arr.ndim == 2:
        arr = arr[np.newaxis]
    paths = []
    for i, frame in enumerate(arr):
        suffix = "" if len(arr) == 1 else f"_{i:04d}"
        path = os.path.join(out_dir, f"{stem}_labels{suffix}.tif")
        tifffile.imwrite(path, np.ascontiguousarray(frame, dtype=np.int32), compression="zlib")
        paths.append(path)
    return paths


def save_arrays(arrays: Mapping[str, np.ndarray], out_dir: str, stem: str) -> list[str]:
    """Extra outputs (e.g. raw model maps) as ``{stem}_{name}.tif``."""
    import tifffile

    paths = []
    for name, arr in arrays.items():
        path = os.path.join(out_dir, f"{stem}_{_UNSAFE.sub('_', name)}.tif")
        tifffile.imwrite(path, np.ascontiguousarray(arr), compression="zlib", photometric="minisblack")
        paths.append(path)
    return paths


def label_members(labels: np.ndarray, stem: str) -> dict[str, np.ndarray]:
    """Zip member name -> int32 frame, named as ``save_labels`` names its files."""
    arr = np.asarray(labels)
    if arr.ndim == 2:
        arr = arr[np.newaxis]
    return {f"{stem}_labels{'' if len(arr) == 1 else f'_{i:04d}'}.tif": frame.astype(np.int32, copy=False)
            for i, frame in enumerate(arr)}


def zip_arrays(members: Mapping[str, np.ndarray], zip_path: str) -> str:
    """Encode each array as a TIFF in memory and write them into one zip (one file on disk)."""
    with open(zip_path, "wb") as fh:
        _write_zip(members, fh)
    return zip_path


def zip_arrays_bytes(members: Mapping[str, np.ndarray]) -> bytes:
    """As ``zip_arrays``, but the zip stays in memory (no temp file to write and delete)."""
    buf = io.BytesIO()
    _write_zip(members, buf)
    return buf.getvalue()


def _write_zip(members: Mapping[str, np.ndarray], fh: BinaryIO) -> None:
    # Level 1: ~2.5x faster than the default 6 on label TIFFs, still ~60x smaller than raw.
    with zipfile.ZipFile(fh, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=ZIP_LEVEL) as zf:
        for name, arr in members.items():
            zf.writestr(name, tiff_bytes(arr))


def tiff_bytes(arr: np.ndarray) -> bytes:
    """``arr`` as an uncompressed TIFF.

    2D images (every segmentation result) go through libtiff (imagecodecs), ~10x faster
    than tifffile's pure-Python tag writer on small images; stacks go through tifffile.
    """
    arr = np.ascontiguousarray(arr)
    if arr.ndim == 2 and arr.size:
        import imagecodecs

        return bytes(imagecodecs.tiff_encode(arr))
    import tifffile

    buf = io.BytesIO()
    tifffile.imwrite(buf, arr, photometric="minisblack")  # a 3-frame stack is not RGB
    return buf.getvalue()


def zip_files(paths: Iterable[str], zip_path: str) -> str:
    """Zip files flat (by base name) into ``zip_path``; returns it."""
    with zipfile.ZipFile(zip_path, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=ZIP_LEVEL) as zf:
        for path in paths:
            zf.write(path, arcname=os.path.basename(path))
    return zip_path
