"""`kiosk results --preview`: the input image with the result's label outlines, as PNG.

Needs numpy, scikit-image, tifffile and Pillow, which come with the ``worker`` extra; the
``cli`` extra stays lean and ``--preview`` without them is a one-line hint.

Segmentation results (``*_batch_{i}_feature_{k}.tif``) get yellow outlines. Tracking results
(``*_feature_0.tif`` plus ``lineage.json``) are a label stack over time: the preview is a strip
of frames, each outline coloured by the track's lineage root, so a mother cell and all its
descendants share a colour and unrelated tracks differ.
"""

from __future__ import annotations

import colorsys
import io
import json
import re
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from kiosk_cli.errors import CliError

HINT = "--preview needs numpy, scikit-image, tifffile and Pillow: pip install 'kiosk-operator[worker,cli]'"
#: Outline colour of a segmentation result.
OUTLINE = (255, 255, 0)
#: Frames of a tracking result shown side by side at most (evenly spaced over the movie).
MAX_FRAMES = 8
_BATCH = re.compile(r"_batch_(\d+)_feature_(\d+)\.tiff?$")


def _imports() -> Any:
    try:
        import numpy as np
        import tifffile
        from PIL import Image
        from skimage.segmentation import find_boundaries
    except ImportError:
        raise CliError(HINT) from None
    return np, tifffile, Image, find_boundaries


def check_installed() -> None:
    """CliError with the install hint unless the imaging libraries are there."""
    _imports()


def lineage_roots(lineage: Mapping[str, Mapping[str, Any]]) -> dict[int, int]:
    """Track id -> the id of its oldest ancestor (itself for a track without a parent)."""
    parents = {int(cid): info.get("parent") for cid, info in lineage.items()}
    roots: dict[int, int] = {}
    for cid in parents:
        node, seen = cid, set()
        while parents.get(node) is not None and node not in seen:
            seen.add(node)
            node = int(parents[node])
        roots[cid] = node
    return roots


def root_colour(root: int) -> tuple[int, int, int]:
    """A bright colour per lineage root (golden-ratio hues: neighbours differ)."""
    hue = (root * 0.618033988749895) % 1.0
    r, g, b = colorsys.hsv_to_rgb(hue, 0.9, 1.0)
    return int(r * 255), int(g * 255), int(b * 255)


def _grey(np: Any, image: Any, shape: tuple[int, ...]) -> Any:
    """The input as an H x W x 3 uint8 background (1st-99th percentile stretch); black if unusable."""
    if image is None:
        return np.zeros((*shape, 3), np.uint8)
    image = np.squeeze(np.asarray(image, dtype=np.float64))
    if image.ndim == 3 and image.shape[-1] <= 4 and image.shape[:2] == shape:
        image = image[..., 0]  # channels last: the first channel
    if image.shape != shape:
        return np.zeros((*shape, 3), np.uint8)
    lo, hi = np.percentile(image, [1, 99])
    scaled = np.zeros(shape) if hi <= lo else np.clip((image - lo) / (hi - lo), 0, 1)
    grey = (scaled * 200).astype(np.uint8)  # never full white: outlines stay visible
    return np.repeat(grey[..., None], 3, axis=2)


def _read(np: Any, tifffile: Any, Image: Any, path: Path) -> Any:
    if path.suffix.lower() in (".tif", ".tiff"):
        return tifffile.imread(path)
    with Image.open(path) as im:
        return np.asarray(im.convert("L"))


def _frames(np: Any, image: Any) -> list[Any]:
    """The 2-D frames of an input (T x H x W, or one H x W image)."""
    if image is None:
        return []
    image = np.squeeze(np.asarray(image))
    if image.ndim == 2:
        return [image]
    if image.ndim == 3 and image.shape[-1] <= 4:
        return [image[..., 0]]
    if image.ndim == 3:
        return list(image)
    return []


def overlay(np: Any, find_boundaries: Any, background: Any, labels: Any,
            colours: Mapping[int, tuple[int, int, int]] | None = None) -> Any:
    """Outlines of ``labels`` drawn on ``background`` (one colour, or one per label id)."""
    out = background.copy()
    edges = find_boundaries(labels, mode="inner")
    if colours is None:
        out[edges] = OUTLINE
        return out
    for cid in np.unique(labels[edges]):
        if cid:
            out[edges & (labels == cid)] = colours.get(int(cid), OUTLINE)
    return out


def write_previews(result_zip: Path, input_path: Path | None, out_dir: Path) -> list[Path]:
    """One PNG per label image in ``result_zip``; returns their paths."""
    np, tifffile, Image, find_boundaries = _imports()
    try:
        with zipfile.ZipFile(result_zip) as zf:
            members = {name: zf.read(name) for name in zf.namelist() if not name.endswith("/")}
    except (OSError, zipfile.BadZipFile) as exc:
        raise CliError(f"cannot preview {result_zip}: not a result zip ({exc})") from None
    image = _read(np, tifffile, Image, input_path) if input_path else None
    frames = _frames(np, image)
    lineage = next((json.loads(data) for name, data in members.items() if name.endswith("lineage.json")), None)
    written = []
    for name in sorted(members):
        if not name.lower().endswith((".tif", ".tiff")):
            continue
        labels = np.squeeze(tifffile.imread(io.BytesIO(members[name])))
        stem = Path(name).name.rsplit(".", 1)[0]
        if lineage is not None and labels.ndim == 3:
            picture = _tracking_strip(np, find_boundaries, labels, frames, lineage)
        elif labels.ndim == 2:
            match = _BATCH.search(name)
            index = int(match.group(1)) if match else 0
            frame = frames[index] if index < len(frames) else (frames[0] if len(frames) == 1 else None)
            picture = overlay(np, find_boundaries, _grey(np, frame, labels.shape), labels)
        else:
            continue
        path = out_dir / f"{stem}_preview.png"
        out_dir.mkdir(parents=True, exist_ok=True)
        Image.fromarray(picture).save(path)
        written.append(path)
    if not written:
        raise CliError(f"cannot preview {result_zip}: no label image in it")
    return written


def _tracking_strip(np: Any, find_boundaries: Any, labels: Any, frames: list[Any],
                    lineage: Mapping[str, Mapping[str, Any]]) -> Any:
    roots = lineage_roots(lineage)
    colours = {cid: root_colour(root) for cid, root in roots.items()}
    count = labels.shape[0]
    shown = min(count, MAX_FRAMES)
    picks = sorted({round(i * (count - 1) / max(1, shown - 1)) for i in range(shown)})
    tiles = []
    for t in picks:
        frame = frames[t] if len(frames) == count else None
        tile = overlay(np, find_boundaries, _grey(np, frame, labels[t].shape), labels[t], colours)
        tiles.append(tile)
        tiles.append(np.full((tile.shape[0], 2, 3), 255, np.uint8))  # a white gap between frames
    return np.concatenate(tiles[:-1], axis=1)

