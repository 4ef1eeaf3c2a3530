"""Deterministic synthetic cell images with ground-truth labels.

Cells are bright ellipses whose intensity falls off towards the rim, on a dark
noisy background; touching cells split the overlap by normalized distance, so
there is an intensity valley along every shared border (as with real nuclei).
The same seed always gives the same images, labels and lineage, which lets
tests compare segmentation and tracking results with the truth.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from scipy import ndimage

__all__ = ["REGIMES", "as_regime", "make_cells", "make_timelapse"]

BACKGROUND = 0.05
NOISE = 0.03


@dataclass(frozen=True)
class _Cell:
    label: int
    y: float
    x: float
    radius: float
    aspect: float  # minor/major axis ratio
    angle: float
    brightness: float


def _default_radius(shape: tuple[int, int], n_cells: int) -> float:
    """Radius that covers ~25% of the image with ``n_cells`` cells."""
    area = 0.25 * shape[0] * shape[1] / max(n_cells, 1)
    return float(np.clip(np.sqrt(area / np.pi), 4.0, 20.0))


def _random_cell(rng: np.random.Generator, label: int, y: float, x: float, r0: float) -> _Cell:
    return _Cell(label, y, x, r0 * rng.uniform(0.8, 1.15), rng.uniform(0.7, 1.0),
                 rng.uniform(0, np.pi), rng.uniform(0.6, 1.0))


def _fits(cells: list[_Cell], cand: _Cell, shape: tuple[int, int], gap: float) -> bool:
    """Inside the image (with margin) and at least ``gap`` apart from every cell rim."""
    m = cand.radius + 2
    if not (m <= cand.y <= shape[0] - m and m <= cand.x <= shape[1] - m):
        return False
    return all(np.hypot(c.y - cand.y, c.x - cand.x) >= c.radius + cand.radius + gap for c in cells)


def _place(rng: np.random.Generator, shape: tuple[int, int], n_cells: int,
           touching: bool, r0: float) -> list[_Cell]:
    """Rejection-sample cell centres; with ``touching`` about a third lean on a neighbour."""
    cells: list[_Cell] = []
    for attempt in range(n_cells * 400):
        if len(cells) >= n_cells:
            break
        label = len(cells) + 1
        if touching and cells and rng.random() < 0.35 and attempt % 7:
            # Overlap a neighbour by 10-25% of the summed radii so the two share a border.
            nb = cells[rng.integers(len(cells))]
            cand = _random_cell(rng, label, 0, 0, r0)
            dist = (nb.radius + cand.radius) * rng.uniform(0.75, 0.9)
            theta = rng.uniform(0, 2 * np.pi)
            cand = replace(cand, y=nb.y + dist * np.sin(theta), x=nb.x + dist * np.cos(theta))
            ok = _fits([c for c in cells if c is not nb], cand, shape, 2.0)
        else:
            cand = _random_cell(rng, label, rng.uniform(0, shape[0]), rng.uniform(0, shape[1]), r0)
            ok = _fits(cells, cand, shape, 3.0)
        if ok:
            cells.append(cand)
    return cells


def _render(shape: tuple[int, int], cells: list[_Cell],
            rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Labels (each pixel to the cell with the smallest normalized distance <= 1) and image."""
    best = np.full(shape, np.inf, dtype=np.float64)
    labels = np.zeros(shape, dtype=np.int32)
    bright = np.zeros(shape, dtype=np.float64)
    for c in cells:
        r = int(np.ceil(c.radius)) + 2
        y0, y1 = max(int(c.y) - r, 0), min(int(c.y) + r + 1, shape[0])
        x0, x1 = max(int(c.x) - r, 0), min(int(c.x) + r + 1, shape[1])
        if y0 >= y1 or x0 >= x1:
            continue
        yy, xx = np.mgrid[y0:y1, x0:x1]
        dy, dx = yy - c.y, xx - c.x
        cos, sin = np.cos(c.angle), np.sin(c.angle)
        u = (dx * cos + dy * sin) / c.radius
        v = (-dx * sin + dy * cos) / (c.radius * c.aspect)
        d = np.hypot(u, v)
        win = (slice(y0, y1), slice(x0, x1))
        take = (d <= 1.0) & (d < best[win])
        best[win][take] = d[take]
        labels[win][take] = c.label
        bright[win][take] = c.brightness
    inside = labels > 0
    image = np.full(shape, BACKGROUND, dtype=np.float64)
    image[inside] = bright[inside] * (1.0 - 0.6 * best[inside] ** 2)
    image = ndimage.gaussian_filter(image, 0.7)
    image += rng.normal(0.0, NOISE, size=shape)
    return image.astype(np.float32), labels


def make_cells(shape: tuple[int, int] = (256, 256), n_cells: int = 20, seed: int = 0,
               touching: bool = True, radius: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic image: ``(image float32 HxW, labels int32 HxW)``.

    Labels are 1..k (k <= n_cells if the image is too crowded), 0 = background. ``radius``
    (pixels) sets the typical cell size; by default cells cover about a quarter of the image.
    The image is float intensities ~0.05 (background) to ~1 (cell centres); ``as_regime``
    turns it into what microscopes write.
    """
    shape = (int(shape[0]), int(shape[1]))
    rng = np.random.default_rng(seed)
    r0 = float(radius) if radius else _default_radius(shape, n_cells)
    cells = _place(rng, shape, n_cells, touching, r0)
    return _render(shape, cells, rng)


#: Intensity regimes of ``as_regime``: what real microscopy images look like on disk.
REGIMES = ("uint8", "uint16-low", "uint16", "float", "float-offset")


def as_regime(image: np.ndarray, labels: np.ndarray, regime: str, seed: int = 0) -> np.ndarray:
    """A ``make_cells`` image as a microscope would save it.

    * ``uint8``: 8 bits over the full range 0..255;
    * ``uint16-low``: 16 bits with a low dynamic range: cells at ~300-1,000 over a noisy
      background of ~100 (a typical camera: most of the 65,535 levels unused);
    * ``uint16``: 16 bits over the full range;
    * ``float``: floats in 0..1;
    * ``float-offset``: floats with an offset and noise that goes negative (background-subtracted).
    """
    rng = np.random.default_rng(seed + 1000)
    unit = np.clip((image - BACKGROUND) / (1.0 - BACKGROUND), 0.0, 1.0)
    if regime == "uint8":
        return np.round(np.clip(image, 0, 1) * 255).astype(np.uint8)
    if regime == "uint16-low":
        out = 100 + rng.normal(0.0, 10.0, image.shape) + (labels > 0) * (300 + 700 * unit)
        return np.round(np.clip(out, 0, 65535)).astype(np.uint16)
    if regime == "uint16":
        return np.round(np.clip(image, 0, 1) * 65535).astype(np.uint16)
    if regime == "float":
        return np.clip(image, 0, 1).astype(np.float32)
    if regime == "float-offset":
        return (image * 0.8 - 0.25 + rng.normal(0.0, 0.02, image.shape)).astype(np.float32)
    raise ValueError(f"unknown regime {regime!r} (one of {', '.join(REGIMES)})")


def _step(rng: np.random.Generator, cells: list[_Cell], shape: tuple[int, int],
          max_step: float) -> list[_Cell]:
    """Random-walk every cell by at most ``max_step`` pixels without collisions."""
    moved: list[_Cell] = []
    for i, c in enumerate(cells):
        dy, dx = rng.uniform(-max_step, max_step, size=2)
        cand = replace(c, y=c.y + dy, x=c.x + dx, angle=c.angle + rng.uniform(-0.05, 0.05))
        others = moved + cells[i + 1:]
        moved.append(cand if _fits(others, cand, shape, 3.0) else c)
    return moved


def _divide(rng: np.random.Generator, cells: list[_Cell], parent: _Cell, next_label: int,
            shape: tuple[int, int]) -> tuple[_Cell, _Cell] | None:
    """Two daughters side by side where the parent was, if they fit."""
    others = [c for c in cells if c.label != parent.label]
    r = parent.radius / np.sqrt(2) * 1.05
    for _ in range(20):
        theta = rng.uniform(0, np.pi)
        off = r * 1.15
        a = replace(parent, label=next_label, radius=r, aspect=min(1.0, parent.aspect + 0.1),
                    y=parent.y + off * np.sin(theta), x=parent.x + off * np.cos(theta))
        b = replace(a, label=next_label + 1, y=parent.y - off * np.sin(theta),
                    x=parent.x - off * np.cos(theta), brightness=rng.uniform(0.6, 1.0))
        if _fits(others, a, shape, 3.0) and _fits(others, b, shape, 3.0) and _fits([a], b, shape, 1.0):
            return a, b
    return None


def make_timelapse(frames: int = 10, shape: tuple[int, int] = (128, 128), n_cells: int = 8,
                   seed: int = 0, divisions: bool = True
                   ) -> tuple[np.ndarray, np.ndarray, dict[int, dict[str, Any]]]:
    """A moving-cells movie: ``(stack float32 TxHxW, labels int32 TxHxW, lineage)``.

    Cells keep their label from frame to frame and move at most ~1.5 px per
    frame. With ``divisions`` a few cells split into two new labels. ``lineage``
    maps label -> {"label", "frames", "parent", "daughters", "frame_div"}
    (frame_div = first frame of the daughters, None if the cell never divides).
    """
    shape = (int(shape[0]), int(shape[1]))
    rng = np.random.default_rng(seed)
    cells = _place(rng, shape, n_cells, False, _default_radius(shape, n_cells) * 0.8)
    n_div = max(1, len(cells) // 4) if divisions and frames > 1 else 0
    div_frames = sorted(rng.choice(np.arange(1, frames), size=min(n_div, frames - 1),
                                   replace=False).tolist()) if n_div else []
    lineage: dict[int, dict[str, Any]] = {
        c.label: {"label": c.label, "frames": [], "parent": None, "daughters": [], "frame_div": None}
        for c in cells}
    next_label = max((c.label for c in cells), default=0) + 1
    images, labels = [], []
    for t in range(frames):
        if t:
            cells = _step(rng, cells, shape, 1.5)
        if t in div_frames:
            # Divide the largest cell that has room, once per division frame.
            for parent in sorted(cells, key=lambda c: -c.radius):
                pair = _divide(rng, cells, parent, next_label, shape)
                if pair is None:
                    continue
                cells = [c for c in cells if c.label != parent.label] + list(pair)
                for d in pair:
                    lineage[d.label] = {"label": d.label, "frames": [], "parent": parent.label,
                                        "daughters": [], "frame_div": None}
                lineage[parent.label]["daughters"] = [pair[0].label, pair[1].label]
                lineage[parent.label]["frame_div"] = t
                next_label += 2
                break
        image, lab = _render(shape, cells, rng)
        for label in np.unique(lab[lab > 0]).tolist():
            lineage[label]["frames"].append(t)
        images.append(image)
        labels.append(lab)
    lineage = {k: v for k, v in lineage.items() if v["frames"]}
    return np.stack(images), np.stack(labels), lineage
