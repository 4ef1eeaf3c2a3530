"""PNG and JPEG headers are read by Pillow's lazy open, touching only the start of the file.

Bytes are counted by a file object that wraps the real file (every ``open`` of the image goes
through it), so the tests say how much of a 20 MiB file a header read pulls from disk.
"""

from __future__ import annotations

import builtins
import io
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from kiosk_worker import imaging
from kiosk_worker.errors import BadImage, ImageTooLarge

MIB = 1 << 20


class _CountingFile(io.FileIO):
    """A raw file that adds every byte it hands out to ``counter['bytes']``."""

    def __init__(self, path: str, counter: dict[str, int]) -> None:
        super().__init__(path, "rb")
        self._counter = counter

    def readinto(self, buffer: Any) -> int | None:
        n = super().readinto(buffer)
        self._counter["bytes"] += n or 0
        return n

    def readall(self) -> bytes:
        data = super().readall()
        self._counter["bytes"] += len(data)
        return data


@pytest.fixture
def bytes_read(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[dict[str, int], set[str]]]:
    """(counter, watched paths): binary opens of a watched path are counted."""
    counter = {"bytes": 0}
    watched: set[str] = set()
    real_open = builtins.open

    def counting_open(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        if str(file) in watched and "b" in mode and "r" in mode:
            return io.BufferedReader(_CountingFile(str(file), counter))
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", counting_open)
    yield counter, watched


def _big_jpeg(path: Path) -> tuple[int, int, int]:
    """A real JPEG of about 20 MiB (noise does not compress)."""
    from PIL import Image

    shape = (2300, 2300, 3)
    pixels = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    Image.fromarray(pixels).save(path, quality=100, subsampling=0)
    assert path.stat().st_size > 18 * MIB
    return shape


def test_a_20_mib_jpeg_header_reads_a_small_part_of_the_file(
        tmp_path: Path, bytes_read: tuple[dict[str, int], set[str]]) -> None:
    path = tmp_path / "big.jpg"
    shape = _big_jpeg(path)
    counter, watched = bytes_read
    watched.add(str(path))
    info = imaging.read_header(str(path))
    assert (info.format, info.shape, info.itemsize) == ("jpeg", shape, 1)
    assert 0 < counter["bytes"] < 256 << 10


def test_a_jpeg_with_no_frame_header_near_its_start_is_refused_without_reading_it_all(
        tmp_path: Path, bytes_read: tuple[dict[str, int], set[str]]) -> None:
    """20 MiB of bytes that are no marker after the JPEG signature: a parser that skips junk
    byte by byte would walk the whole file; the header read stops at HEADER_SCAN_BYTES."""
    path = tmp_path / "junk.jpg"
    junk = np.random.default_rng(1).integers(0, 255, 20 * MIB, dtype=np.uint8).tobytes()  # no 0xFF
    app0 = b"\xff\xe0" + struct.pack(">H", 16) + b"JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00"
    path.write_bytes(b"\xff\xd8" + app0 + junk)
    counter, watched = bytes_read
    watched.add(str(path))
    with pytest.raises(BadImage, match="JPEG has no frame header"):
        imaging.read_header(str(path))
    assert counter["bytes"] <= imaging.HEADER_SCAN_BYTES + (64 << 10)
    counter["bytes"] = 0
    with pytest.raises(BadImage, match="no frame header"):
        imaging.load_image(str(path))
    assert counter["bytes"] <= imaging.HEADER_SCAN_BYTES + (64 << 10)


@pytest.mark.parametrize("dtype,mode_bytes", [(np.uint8, 1), (np.uint16, 2)])
def test_a_large_png_header_reads_a_small_part_and_knows_the_sample_size(
        tmp_path: Path, bytes_read: tuple[dict[str, int], set[str]], dtype: type,
        mode_bytes: int) -> None:
    from PIL import Image

    path = tmp_path / "big.png"
    pixels = np.random.default_rng(2).integers(0, 255, (2600, 2600), dtype=dtype)
    Image.fromarray(pixels).save(path, compress_level=0)
    assert path.stat().st_size > 6 * MIB
    counter, watched = bytes_read
    watched.add(str(path))
    info = imaging.read_header(str(path))
    assert (info.shape, info.itemsize, info.decoded_bytes) == ((2600, 2600), mode_bytes,
                                                               pixels.nbytes)
    assert 0 < counter["bytes"] < 256 << 10
    assert np.array_equal(imaging.load_image(str(path), 4096, 4096), pixels)


@pytest.mark.parametrize("mode,shape", [("RGB", (40, 30, 3)), ("RGBA", (40, 30, 4)),
                                        ("LA", (40, 30, 2)), ("P", (40, 30)), ("L", (40, 30))])
def test_png_bands_match_the_decoded_array(tmp_path: Path, mode: str, shape: tuple[int, ...]) -> None:
    from PIL import Image

    path = tmp_path / f"{mode}.png"
    Image.new(mode, (30, 40)).save(path)
    assert imaging.read_header(str(path)).shape == shape == imaging.load_image(str(path)).shape


def test_a_png_claiming_a_huge_size_is_refused_by_our_limits_not_pillows(tmp_path: Path) -> None:
    """Pillow's own decompression-bomb error would name no limit a Kiosk operator can set."""
    path = tmp_path / "huge.png"
    ihdr = b"IHDR" + struct.pack(">IIBBBBB", 30000, 40000, 8, 0, 0, 0, 0)
    idat = b"IDAT" + zlib.compress(b"\x00" * 64)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + b"".join(
        struct.pack(">I", len(c) - 4) + c + struct.pack(">I", zlib.crc32(c)) for c in (ihdr, idat)))
    assert imaging.read_header(str(path)).shape == (40000, 30000)
    with pytest.raises(ImageTooLarge, match="over the limit"):
        imaging.load_image(str(path), 8192, 8192)
