"""PNG and JPEG headers through Pillow's lazy open, within a bounded prefix of the file."""

from __future__ import annotations

import io
import os
from typing import BinaryIO

from kiosk_protocol.errors import describe
from kiosk_worker.errors import BadImage

ERROR_LIMIT = 120

#: Bytes of a PNG or JPEG file its header read may look at. Everything Pillow reads before the
#: pixel data (metadata segments of at most 64 KiB each, text chunks) sits well inside it in any
#: file a camera or microscope writes; a file with no frame header there is refused instead of
#: scanned to its end (a JPEG's junk bytes are skipped one read at a time).
HEADER_SCAN_BYTES = 4 << 20
#: Bytes per sample of the array Pillow decodes, by mode ("I;16" and its byte orders: 2).
_PIL_ITEMSIZE = {"I": 4, "F": 4}


class _Prefix(io.RawIOBase):
    """The first ``limit`` bytes of a file, read-only and seekable: a bounded view for a header
    parser, so that nothing it does can read past the limit."""

    def __init__(self, raw: BinaryIO, limit: int) -> None:
        super().__init__()
        self._raw = raw
        self._limit = limit
        self._pos = 0
        #: Set when a read was cut at the limit (the header did not end inside the view).
        self.hit_limit = False

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._limit}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def readinto(self, buffer: memoryview | bytearray) -> int:  # type: ignore[override]
        want = min(len(buffer), self._limit - self._pos)
        if want <= 0:
            self.hit_limit = self.hit_limit or len(buffer) > 0
            return 0
        self._raw.seek(self._pos)
        data = self._raw.read(want)
        buffer[: len(data)] = data
        self._pos += len(data)
        if len(data) == want < len(buffer):
            self.hit_limit = True
        return len(data)


def pil_class(fmt: str) -> type:
    """The Pillow plugin class itself: ``Image.open`` would add its own decompression-bomb
    limit (a warning or error by pixel count), where ours are the header checks."""
    if fmt == "png":
        from PIL import PngImagePlugin

        return PngImagePlugin.PngImageFile
    from PIL import JpegImagePlugin

    return JpegImagePlugin.JpegImageFile


def pil_header(path: str, fmt: str) -> tuple[tuple[int, ...], int]:
    """(shape, bytes per sample) from Pillow's lazy open (no pixel decoded), reading at most
    HEADER_SCAN_BYTES of the file."""
    with open(path, "rb") as raw:
        view = _Prefix(raw, HEADER_SCAN_BYTES)
        try:
            img = pil_class(fmt)(io.BufferedReader(view, buffer_size=16 << 10))
        except Exception as err:
            if view.hit_limit:
                raise BadImage(f"{fmt.upper()} has no frame header in its first {HEADER_SCAN_BYTES}"
                               " bytes") from None
            raise BadImage(f"cannot read {fmt.upper()} header of '{os.path.basename(path)}': "
                           f"{describe(err, ERROR_LIMIT)}") from None
        with img:
            width, height = img.size
            bands = len(img.getbands())
            itemsize = 2 if img.mode.startswith("I;16") else _PIL_ITEMSIZE.get(img.mode, 1)
    return ((height, width) if bands == 1 else (height, width, bands)), itemsize
