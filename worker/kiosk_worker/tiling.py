"""Cut images larger than a model's fixed input into overlapping tiles, and stitch back.

Neighbouring tiles overlap (deepcell's tile_image: a quarter of the tile by default).
``untile`` blends them as deepcell-toolbox's ``untile_image`` does: every output pixel is the
average of the tiles that cover it, each weighted by a window that is 1 in the tile's middle
and falls smoothly towards its edges, so an object on a tile border is predicted by the tiles
in which it is whole and nothing is cut at a seam. ``stitch`` instead takes every pixel from
the one tile in which it lies farthest from an edge (a hard seam in the middle of each overlap).
Images smaller than the tile are zero-padded. Everything here is pure numpy.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["Span", "TilePlan", "needs_tiling", "plan_axis", "plan_tiles", "stitch", "tile_image", "untile", "window"]


@dataclass(frozen=True)
class Span:
    """One tile along an axis: input window [origin, origin+tile), owned output [start, stop)."""

    origin: int
    start: int
    stop: int


def plan_axis(length: int, tile: int, overlap: int) -> list[Span]:
    """Tiles covering ``length`` with at least ``overlap`` pixels shared by neighbours."""
    if tile <= 0:
        raise ValueError("tile size must be positive")
    if length <= tile:
        return [Span(0, 0, length)]
    overlap = max(0, min(overlap, tile - 1))
    stride = tile - overlap
    origins = list(range(0, length - tile, stride)) + [length - tile]
    origins = sorted(set(origins))
    spans = []
    for i, origin in enumerate(origins):
        start = 0 if i == 0 else (origin + origins[i - 1] + tile) // 2
        stop = length if i == len(origins) - 1 else (origins[i + 1] + origin + tile) // 2
        spans.append(Span(origin, start, stop))
    return spans


@dataclass(frozen=True)
class TilePlan:
    """How an (N, H, W, C) batch was cut: tiles are ordered frame, row, column."""

    frames: int
    height: int
    width: int
    tile_h: int
    tile_w: int
    rows: tuple[Span, ...]
    cols: tuple[Span, ...]

    @property
    def count(self) -> int:
        return self.frames * len(self.rows) * len(self.cols)


def needs_tiling(height: int, width: int, tile_h: int | None, tile_w: int | None) -> bool:
    """A model with a fixed input size needs tiles unless the image has exactly that size."""
    return bool(tile_h and tile_w) and (height, width) != (tile_h, tile_w)


def plan_tiles(frames: int, height: int, width: int, tile_h: int, tile_w: int,
               overlap: float = 0.25) -> TilePlan:
    """Overlap is a fraction of the tile size (or a pixel count if >= 1)."""
    ov_h = int(overlap if overlap >= 1 else round(tile_h * overlap))
    ov_w = int(overlap if overlap >= 1 else round(tile_w * overlap))
    return TilePlan(frames, height, width, tile_h, tile_w,
                    tuple(plan_axis(height, tile_h, ov_h)), tuple(plan_axis(width, tile_w, ov_w)))


def tile_image(image: np.ndarray, tile_h: int, tile_w: int,
               overlap: float = 0.25) -> tuple[np.ndarray, TilePlan]:
    """(N, H, W, C) -> tiles (M, tile_h, tile_w, C) and the plan to stitch them."""
    n, h, w, c = image.shape
    plan = plan_tiles(n, h, w, tile_h, tile_w, overlap)
    pad_h, pad_w = max(0, tile_h - h), max(0, tile_w - w)
    if pad_h or pad_w:
        image = np.pad(image, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="constant")
    tiles = np.empty((plan.count, tile_h, tile_w, c), dtype=image.dtype)
    i = 0
    for f in range(n):
        for r in plan.rows:
            for col in plan.cols:
                tiles[i] = image[f, r.origin:r.origin + tile_h, col.origin:col.origin + tile_w]
                i += 1
    return tiles, plan


def stitch(tiles: np.ndarray, plan: TilePlan) -> np.ndarray:
    """Model outputs per tile (M, tile_h, tile_w, K) -> (N, H, W, K)."""
    if tiles.shape[0] != plan.count or tiles.shape[1:3] != (plan.tile_h, plan.tile_w):
        raise ValueError(f"expected {plan.count} tiles of {plan.tile_h}x{plan.tile_w}, "
                         f"got shape {list(tiles.shape)}")
    out = np.empty((plan.frames, plan.height, plan.width) + tiles.shape[3:], dtype=tiles.dtype)
    i = 0
    for f in range(plan.frames):
        for r in plan.rows:
            for col in plan.cols:
                out[f, r.start:r.stop, col.start:col.stop] = tiles[
                    i, r.start - r.origin:r.stop - r.origin, col.start - col.origin:col.stop - col.origin]
                i += 1
    return out


def window(size: int, power: int = 2) -> np.ndarray:
    """1D blending weights of a tile: a second-order spline (deepcell-toolbox's spline window)
    rising from ~0 at both edges to 1 in the middle."""
    pos = (np.arange(size, dtype=np.float64) + 0.5) / size  # (0, 1)
    tri = 1.0 - np.abs(2.0 * pos - 1.0)  # 0 at the edges, 1 in the middle
    inner = 1.0 - (np.abs(2.0 * (1.0 - tri)) ** power) / 2.0
    outer = (np.abs(2.0 * tri) ** power) / 2.0
    spline = np.where(tri > 0.5, inner, outer)
    return np.maximum(spline, 1e-3)


def untile(tiles: np.ndarray, plan: TilePlan) -> np.ndarray:
    """Model outputs per tile (M, tile_h, tile_w, K) -> (N, H, W, K), blended (see module doc)."""
    if tiles.shape[0] != plan.count or tiles.shape[1:3] != (plan.tile_h, plan.tile_w):
        raise ValueError(f"expected {plan.count} tiles of {plan.tile_h}x{plan.tile_w}, "
                         f"got shape {list(tiles.shape)}")
    height, width = max(plan.height, plan.tile_h), max(plan.width, plan.tile_w)
    extra = tiles.shape[3:]
    total = np.zeros((plan.frames, height, width) + extra, dtype=np.float64)
    weight = np.zeros((height, width), dtype=np.float64)
    win = np.outer(window(plan.tile_h), window(plan.tile_w))
    win_k = win.reshape(win.shape + (1,) * len(extra))
    for r in plan.rows:
        for col in plan.cols:
            weight[r.origin:r.origin + plan.tile_h, col.origin:col.origin + plan.tile_w] += win
    i = 0
    for f in range(plan.frames):
        for r in plan.rows:
            for col in plan.cols:
                total[f, r.origin:r.origin + plan.tile_h, col.origin:col.origin + plan.tile_w] += (
                    tiles[i] * win_k)
                i += 1
    weight = weight.reshape(weight.shape + (1,) * len(extra))
    out = total / weight
    return out[:, :plan.height, :plan.width].astype(tiles.dtype, copy=False)
