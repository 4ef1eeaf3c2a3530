"""Load input images safely and shape them for a model.

Sizes are read from the file header before any pixel is decoded (TIFF, PNG,
JPEG by Pillow's lazy open, NPY), so an oversized image is rejected without allocating it. Loaded
images are normalised to ``(N, H, W, C)``: N frames (batch/time/z axes
flattened), C channels, following the job's ``dimension_order`` and ``channels``.

``dimension_order`` is read as the Kiosk consumer's ``image_dimensions_to_bxyc`` reads
the orders the Kiosk frontend offers (``XY``, ``BXY``, ``CXY``, ``XYB``, ``XYC``,
``BXYC``, ``CXYB``): the number of letters must equal the image's rank, B axes go
first, C last, and the two spatial axes keep their order in the file. Upstream names
the array's first spatial axis X, so ``XY`` and ``YX`` both mean "rows, then columns
as stored" and nothing is ever transposed; results come back in the same orientation.
Our own orders (``YXC``, ``CYX``, ``ZYX``, ``TCYX``, ``BZYXC``: B/T/Z/S/N are batch-like
axes, flattened into N in order) read the same way; '' guesses a common layout. PNG and
JPEG images have a channel axis when the order has three letters, as upstream loads them
(``img_to_array``): a grayscale PNG with ``XYB`` is one batch item of one channel.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from kiosk_protocol.errors import describe
from kiosk_protocol.settings import Settings
from kiosk_worker.errors import BadImage, ImageTooLarge, InputMissing, ModelMismatch, UnsupportedFormat
from kiosk_worker.pil_header import HEADER_SCAN_BYTES, pil_class, pil_header  # noqa: F401 - HEADER_SCAN_BYTES re-exported

__all__ = [
    "FORMATS",
    "ImageInfo",
    "check_size",
    "detect_format",
    "detected_dim_order",
    "fit_channels",
    "frame_count",
    "load_image",
    "read_header",
    "rescale",
    "resize_labels",
    "to_nhwc",
]

FORMATS = ("tiff", "png", "jpeg", "npy")
_EXTENSIONS = {".tif": "tiff", ".tiff": "tiff", ".png": "png", ".jpg": "jpeg", ".jpeg": "jpeg",
               ".npy": "npy"}
_BATCH_AXES = "BTZSN"
#: Longest decoder message quoted in a BadImage reason.
ERROR_LIMIT = 120
#: TIFF compressions decoded (tifffile COMPRESSION names): the common lossless ones, baseline
#: JPEG and WebP. Any other codec imagecodecs happens to have (JPEG 2000, JPEG XL, LERC, ...)
#: is refused by name: each is more decoder surface for a job from a public form.
TIFF_COMPRESSIONS = frozenset({"NONE", "LZW", "JPEG", "ADOBE_DEFLATE", "DEFLATE", "PACKBITS",
                               "LZMA", "ZSTD", "WEBP"})


@dataclass(frozen=True)
class ImageInfo:
    """What the header says: format, array shape and dtype (None if unknown)."""

    format: str
    shape: tuple[int, ...]
    dtype: str | None = None
    #: Bytes per sample (decoded), when the header does not give a numpy dtype (PNG, JPEG).
    itemsize: int = 1

    @property
    def decoded_bytes(self) -> int:
        """Bytes the decoded array takes: every axis (frames included) x bytes per sample."""
        size = np.dtype(self.dtype).itemsize if self.dtype else self.itemsize
        total = size
        for dim in self.shape:
            total *= int(dim)
        return total


def detect_format(path: str) -> str:
    """Format from the magic bytes (falls back to the extension only to name it)."""
    with open(path, "rb") as fh:
        head = fh.read(16)
    if not head:
        raise BadImage(f"input file '{os.path.basename(path)}' is empty")
    if head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return "tiff"
    if head[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if head[:3] == b"\xff\xd8\xff":
        return "jpeg"
    if head[:6] == b"\x93NUMPY":
        return "npy"
    ext = os.path.splitext(path)[1].lower()
    if ext in _EXTENSIONS:
        kind = _EXTENSIONS[ext].upper()
        raise BadImage(f"input file '{os.path.basename(path)}' is not a valid {kind} image")
    raise UnsupportedFormat(
        f"unsupported input format '{ext or os.path.basename(path)}': use TIFF, PNG, JPEG or NPY")


def read_header(path: str) -> ImageInfo:
    """Shape without decoding pixels; raises BadImage if the header is unreadable."""
    fmt = detect_format(path)
    name = os.path.basename(path)
    try:
        if fmt == "tiff":
            import tifffile

            with tifffile.TiffFile(path) as tif:
                return _tiff_info(tif, name)
        if fmt == "npy":
            fmt_mod = np.lib.format
            with open(path, "rb") as fh:
                version = fmt_mod.read_magic(fh)
                if version == (1, 0):
                    shape, _, dtype = fmt_mod.read_array_header_1_0(fh)
                elif version == (2, 0):
                    shape, _, dtype = fmt_mod.read_array_header_2_0(fh)
                else:  # a memory map reads only the header of newer versions
                    mapped = np.load(path, mmap_mode="r", allow_pickle=False)
                    shape, dtype = mapped.shape, mapped.dtype
                    del mapped
            return ImageInfo(fmt, tuple(int(s) for s in shape), str(dtype))
        return _pil_header(path, fmt)
    except BadImage:
        raise
    except Exception as err:
        raise BadImage(f"cannot read {fmt.upper()} header of '{name}': {describe(err, ERROR_LIMIT)}") from None


def _pil_header(path: str, fmt: str) -> ImageInfo:
    shape, itemsize = pil_header(path, fmt)
    return ImageInfo(fmt, shape, None, itemsize)


def check_size(info: ImageInfo, max_height: int, max_width: int, dimension_order: str = "",
               max_decoded_bytes: int | None = None) -> None:
    """Reject images over the limits using only the header: height, width and the decoded
    size (every frame and channel; the MAX_DECODED_BYTES default when None)."""
    limit = Settings.max_decoded_bytes if max_decoded_bytes is None else max_decoded_bytes
    if info.decoded_bytes > limit:
        what = "x".join(str(d) for d in info.shape) + (f" {info.dtype}" if info.dtype else "")
        raise ImageTooLarge(f"image {what} decodes to {info.decoded_bytes} bytes, over the limit of "
                            f"{limit} (MAX_DECODED_BYTES)")
    shape = _with_channel_axis(info.format, info.shape, dimension_order)
    if len(shape) < 2:
        raise BadImage(f"image has {len(shape)} dimension(s); at least height and width are needed")
    order = _normalise_order(dimension_order, len(shape)) or _guess_order(len(shape), shape)
    rows, cols = _spatial_axes(order)
    height, width = shape[rows], shape[cols]
    if height > max_height or width > max_width:
        raise ImageTooLarge(
            f"image is {height}x{width} pixels, over the limit of {max_height}x{max_width}"
            " (MAX_IMAGE_HEIGHT x MAX_IMAGE_WIDTH)")
    if height == 0 or width == 0:
        raise BadImage("image has zero height or width")


def load_image(path: str, max_height: int = 8192, max_width: int = 8192,
               dimension_order: str = "", max_decoded_bytes: int | None = None) -> np.ndarray:
    """Header check (size, decoded bytes, TIFF compression), then decode; returns the raw
    array (any rank). ``max_decoded_bytes`` None means the MAX_DECODED_BYTES default."""
    if not os.path.isfile(path):
        raise InputMissing(f"input file not found: {os.path.basename(path)}")
    fmt = detect_format(path)
    if fmt == "tiff":
        array = _load_tiff(path, max_height, max_width, dimension_order, max_decoded_bytes)
    else:
        array = _load_other(path, read_header(path), max_height, max_width, dimension_order,
                            max_decoded_bytes)
        if array.ndim == 2 and len(_with_channel_axis(fmt, array.shape, dimension_order)) == 3:
            array = array[..., np.newaxis]
    name = os.path.basename(path)
    if array.dtype.kind not in "biuf":
        raise BadImage(f"image '{name}' has unsupported pixel type {array.dtype}")
    if array.size == 0:
        raise BadImage(f"image '{name}' is empty")
    return array


def _tiff_info(tif: object, name: str) -> ImageInfo:
    series = tif.series  # type: ignore[attr-defined]
    if not series:
        raise BadImage(f"TIFF '{name}' contains no image")
    return ImageInfo("tiff", tuple(int(s) for s in series[0].shape), str(series[0].dtype))


def _tiff_compressions(tif: object) -> set[str]:
    """Compression names of every page of the first series (the one decoded)."""
    names = set()
    for page in tif.series[0].pages:  # type: ignore[attr-defined]
        if page is None:
            continue
        page = getattr(page, "keyframe", None) or page
        value = page.compression
        names.add(getattr(value, "name", str(value)))
    return names


def _load_tiff(path: str, max_height: int, max_width: int, dimension_order: str,
               max_decoded_bytes: int | None = None) -> np.ndarray:
    """Header check and decode through one open TiffFile (as read_header, then imread)."""
    import tifffile

    name = os.path.basename(path)
    try:
        tif = tifffile.TiffFile(path)
    except Exception as err:
        raise BadImage(f"cannot read TIFF header of '{name}': {describe(err, ERROR_LIMIT)}") from None
    with tif:
        try:
            info = _tiff_info(tif, name)
        except BadImage:
            raise
        except Exception as err:
            raise BadImage(f"cannot read TIFF header of '{name}': {describe(err, ERROR_LIMIT)}") from None
        check_size(info, max_height, max_width, dimension_order, max_decoded_bytes)
        try:
            refused = sorted(_tiff_compressions(tif) - TIFF_COMPRESSIONS)
        except Exception as err:
            raise BadImage(f"cannot read TIFF header of '{name}': {describe(err, ERROR_LIMIT)}") from None
        if refused:
            raise UnsupportedFormat(
                f"TIFF '{name}' uses compression {', '.join(refused)}, which is not accepted"
                f" (use one of {', '.join(sorted(TIFF_COMPRESSIONS))})")
        try:
            return tif.asarray()
        except Exception as err:
            raise BadImage(f"cannot decode TIFF image '{name}': {describe(err, ERROR_LIMIT)}") from None


def _load_other(path: str, info: ImageInfo, max_height: int, max_width: int,
                dimension_order: str, max_decoded_bytes: int | None = None) -> np.ndarray:
    check_size(info, max_height, max_width, dimension_order, max_decoded_bytes)
    name = os.path.basename(path)
    try:
        if info.format == "npy":
            array = np.load(path, allow_pickle=False)
        else:
            with pil_class(info.format)(path) as img:
                img.load()
                array = np.asarray(img)
    except Exception as err:
        raise BadImage(f"cannot decode {info.format.upper()} image '{name}': {describe(err, ERROR_LIMIT)}") from None
    return array


def _with_channel_axis(fmt: str, shape: tuple[int, ...], dimension_order: str) -> tuple[int, ...]:
    """A single-band PNG/JPEG has a channel axis when the order has three letters (as upstream's
    ``img_to_array`` always gives one), so ``XYB`` / ``XYC`` / ``CXY`` work on grayscale PNGs."""
    if fmt in ("png", "jpeg") and len(shape) == 2 and len((dimension_order or "").strip()) == 3:
        return (*shape, 1)
    return tuple(shape)


def _spatial_axes(order: str) -> tuple[int, int]:
    """(rows, columns): the two spatial axes in file order, whichever of X/Y comes first."""
    first, second = sorted((order.index("Y"), order.index("X")))
    return first, second


def _normalise_order(order: str, ndim: int) -> str:
    """Validate a ``dimension_order`` like 'YXC' / 'CYX' / 'ZYX'; '' means guess."""
    text = (order or "").strip().upper()
    if not text:
        return ""
    if len(text) != ndim:
        raise BadImage(f"dimension_order '{order}' has {len(text)} axes but the image has {ndim}")
    allowed = set("YXC" + _BATCH_AXES)
    if set(text) - allowed or len(set(text)) != len(text) or "Y" not in text or "X" not in text:
        raise BadImage(f"dimension_order '{order}' must name Y and X once each, plus C and B/T/Z axes")
    return text


def _guess_order(ndim: int, shape: Sequence[int] | None) -> str:
    """Common layouts: YX, YXC / CYX / ZYX, BYXC / BCYX / ZCYX ..."""
    if ndim == 2:
        return "YX"
    if ndim == 3:
        if shape is None or shape[-1] <= 4:
            return "YXC"
        return "CYX" if shape[0] <= 4 else "ZYX"
    if ndim == 4:
        if shape is None or shape[-1] <= 4:
            return "BYXC"
        return "BCYX" if shape[1] <= 4 else "BZYX"
    if ndim == 5:
        return "BZYXC" if shape is None or shape[-1] <= 4 else "BZCYX"
    raise BadImage(f"image has {ndim} dimensions; expected 2 to 5")


def frame_count(shape: Sequence[int], dimension_order: str = "") -> int:
    """How many (H, W, C) frames ``to_nhwc`` makes of an array of ``shape`` (from a header)."""
    order = _normalise_order(dimension_order, len(shape)) or _guess_order(len(shape), shape)
    return int(np.prod([shape[i] for i, a in enumerate(order) if a in _BATCH_AXES], dtype=np.int64))


def to_nhwc(array: np.ndarray, dimension_order: str = "") -> np.ndarray:
    """Any supported layout -> (N, H, W, C), batch-like axes flattened into N.

    As upstream's ``image_dimensions_to_bxyc`` for its orders: B first, C last, the spatial
    axes in file order (``XY`` is not transposed).
    """
    if array.ndim < 2 or array.ndim > 5:
        raise BadImage(f"image has {array.ndim} dimension(s); expected 2 to 5 (e.g. YX, YXC, ZYX)")
    order = _normalise_order(dimension_order, array.ndim) or _guess_order(array.ndim, array.shape)
    if "C" not in order:
        array, order = array[..., np.newaxis], order + "C"
    batch = [i for i, a in enumerate(order) if a in _BATCH_AXES]
    perm = batch + [*_spatial_axes(order), order.index("C")]
    moved = np.transpose(array, perm)
    h, w, c = moved.shape[-3:]
    return moved.reshape((-1, h, w, c))


def fit_channels(image: np.ndarray, channels: str, model_channels: int | None,
                 max_entries: int | None = None) -> np.ndarray:
    """Pick the job's ``channels`` for one model and match the model's channel count.

    ``channels`` as the Kiosk frontend writes it: '0,1', '0,' (one channel: blank entries
    are positions without a channel), ',2'. Blank entries become all-zero channels only when
    that is what makes the count match a model with a fixed channel count (e.g. ',2' for a
    two-channel model: no nuclear channel, channel 2 second); otherwise they are dropped.
    '' keeps every channel. ``model_channels`` None means the model accepts any count.
    Every check (at most ``max_entries`` entries, the MAX_CHANNEL_ENTRIES default when None; indexes in
    the image; the model's count) comes before a channel is copied.
    """
    text = (channels or "").strip()
    if text:
        limit = Settings.max_channel_entries if max_entries is None else max_entries
        count = text.count(",") + 1
        if count > limit:
            raise BadImage(f"channels lists {count} entries, more than MAX_CHANNEL_ENTRIES ({limit})")
        entries: list[int | None] = []
        for part in text.split(","):
            part = part.strip()
            if not part:
                entries.append(None)
                continue
            try:
                idx = int(part)
            except ValueError:
                raise BadImage(f"channels '{channels}' must be comma-separated channel numbers") from None
            if not 0 <= idx < image.shape[-1]:
                raise ModelMismatch(
                    f"channels '{channels}' asks for channel {idx} but the image has {image.shape[-1]}")
            entries.append(idx)
        if not (model_channels and len(entries) == model_channels):
            entries = [e for e in entries if e is not None]
        if not entries:
            raise BadImage(f"channels '{channels}' names no channel")
        if model_channels is not None and model_channels > 0 and len(entries) != model_channels:
            raise ModelMismatch(  # before the copy; the wording of the check below
                f"image has {len(entries)} channel(s) but the model expects {model_channels};"
                " set 'channels' to choose them")
        blank = np.zeros(image.shape[:-1], dtype=image.dtype)
        image = np.stack([blank if e is None else image[..., e] for e in entries], axis=-1)
    if model_channels is not None and model_channels > 0 and image.shape[-1] != model_channels:
        raise ModelMismatch(
            f"image has {image.shape[-1]} channel(s) but the model expects {model_channels};"
            " set 'channels' to choose them")
    return image


def rescale(image: np.ndarray, scale: float, max_height: int = 8192, max_width: int = 8192) -> np.ndarray:
    """(N, H, W, C) resized by ``scale`` to (N, int(H*scale), int(W*scale), C), bilinear.

    What the deepcell application does with ``image_mpp = scale * model_mpp``: the image is
    brought to the model's resolution. 1 returns the image unchanged.
    """
    if scale == 1:
        return image
    n, h, w, c = image.shape
    new_h, new_w = int(h * scale), int(w * scale)
    if new_h < 1 or new_w < 1:
        raise BadImage(f"scale {scale:g} shrinks the {h}x{w} image to nothing")
    if new_h > max_height or new_w > max_width:
        raise ImageTooLarge(f"scale {scale:g} makes the {h}x{w} image {new_h}x{new_w} pixels, over the "
                            f"limit of {max_height}x{max_width} (MAX_IMAGE_HEIGHT x MAX_IMAGE_WIDTH)")
    from skimage.transform import resize

    out = resize(image.astype(np.float32, copy=False), (n, new_h, new_w, c), order=1, mode="edge",
                 preserve_range=True, anti_aliasing=False)
    return out.astype(np.float32, copy=False)


def resize_labels(labels: np.ndarray, height: int, width: int) -> np.ndarray:
    """(N, h, w) labels -> (N, height, width) by nearest neighbour (no new label values)."""
    _, h, w = labels.shape
    if (h, w) == (height, width):
        return labels
    rows = np.minimum(((np.arange(height) + 0.5) * h / height).astype(np.intp), h - 1)
    cols = np.minimum(((np.arange(width) + 0.5) * w / width).astype(np.intp), w - 1)
    return labels[:, rows][:, :, cols]


def detected_dim_order(image_shape: Sequence[int], model_rank: int = 4) -> str:
    """The ``dim_order`` the Kiosk's mesmer and spot consumers write back into the job hash
    (base_consumer.detect_dimension_order): the model's spatial axes (``YX`` for a rank-4
    input) with ``C`` after them when the image's smallest non-batch axis is its last, before
    them otherwise. ``image_shape`` is the image as the consumer holds it before its batch axis
    is added (the mesmer consumer: the file's array with length-1 axes squeezed)."""
    order = "ZYX"[-(model_rank - 2):]
    dims = list(image_shape)
    channel_axis = dims.index(min(dims)) + 1 if dims else model_rank - 1
    return f"{order}C" if channel_axis == model_rank - 1 else f"C{order}"
