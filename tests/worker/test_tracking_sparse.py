"""Tracking stays sparse: overlaps and the assignment cost memory by overlapping pairs, never
cells x cells, and the sparse assignment finds the dense optimum."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment

from kiosk_worker import tracking

MIB = 1 << 20


def _grid(cells_per_side: int, cell: int, shift: int = 0) -> np.ndarray:
    """Square cells of ``cell`` pixels, labels 1..cells_per_side**2, moved by ``shift``."""
    size = cells_per_side * cell
    idx = np.clip((np.arange(size) - shift) // cell, 0, cells_per_side - 1)
    return (idx[:, None] * cells_per_side + idx[None, :] + 1).astype(np.int32)


def _blobs(rng: np.random.Generator, shape: tuple[int, int], count: int) -> np.ndarray:
    """Random overlapping discs (later ones on top): crowded, ambiguous matches."""
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    out = np.zeros(shape, np.int32)
    for label in rng.permutation(np.arange(1, count + 1)):
        cy, cx = rng.uniform(0, shape[0]), rng.uniform(0, shape[1])
        r = rng.uniform(3, 9)
        out[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = label
    return out


def test_a_frame_pair_of_5000_cells_tracks_within_a_memory_bound() -> None:
    """A dense 5041 x 5041 overlap alone would be 194 MiB (int64), its IoU as much again."""
    cells = 71  # 5,041 cells of 8 x 8 pixels
    stack = np.stack([_grid(cells, 8), _grid(cells, 8, shift=2)])
    params = tracking.TrackingParams(max_cells=6000)
    tracemalloc.start()
    try:
        result = tracking.track(stack, params)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(result.lineage) == cells * cells
    assert all(info["frames"] == [0, 1] for info in result.lineage.values())
    # every cell keeps its id: its centre pixel carries the same track in both frames
    centre = np.arange(cells) * 8 + 4
    assert (result.labels[0][np.ix_(centre, centre)] == result.labels[1][np.ix_(centre + 2, centre + 2)]).all()
    assert peak < 48 * MIB, f"peak {peak / MIB:.0f} MiB"


@pytest.mark.parametrize("seed", range(6))
def test_the_sparse_assignment_reaches_the_dense_optimum(seed: int) -> None:
    rng = np.random.default_rng(seed)
    prev = _blobs(rng, (96, 96), 60)
    nxt = _blobs(rng, (96, 96), 60) if seed % 2 else np.roll(prev, (2, 3), (0, 1))
    ov = tracking.frame_overlap(prev, nxt)
    dense = ov.iou.toarray()
    params = tracking.TrackingParams(min_iou=0.0)
    links = tracking.match_cells(ov, params)
    assert len({r for r, _ in links}) == len({c for _, c in links}) == len(links)  # one-to-one
    r, c = linear_sum_assignment(dense, maximize=True)
    assert sum(dense[a, b] for a, b in links) == pytest.approx(dense[r, c].sum())
    # with a threshold, the links are the optimum's links at or above it
    strict = tracking.match_cells(ov, tracking.TrackingParams(min_iou=0.3))
    assert all(dense[a, b] >= 0.3 for a, b in strict)
    assert sum(dense[a, b] for a, b in strict) == pytest.approx(
        sum(dense[a, b] for a, b in zip(r, c, strict=True) if dense[a, b] >= 0.3))


def test_skipped_rows_and_columns_are_left_out_of_the_assignment() -> None:
    prev = _grid(4, 8)
    nxt = _grid(4, 8, shift=1)
    ov = tracking.frame_overlap(prev, nxt)
    links = tracking.match_cells(ov, skip_rows={0, 5}, skip_cols={3})
    assert links and all(r not in (0, 5) and c != 3 for r, c in links)
    assert tracking.match_cells(ov, skip_rows=set(range(16))) == []


def test_huge_label_values_are_relabelled_without_a_table_of_their_size() -> None:
    """A label of 2**31 - 1 must not size a lookup table (8 GiB of int32)."""
    stack = np.stack([_grid(4, 8), _grid(4, 8, shift=1)]).astype(np.int64)
    stack[stack == 16] = 2**31 - 1
    tracemalloc.start()
    try:
        result = tracking.track(stack)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(result.lineage) == 16 and peak < 16 * MIB
