"""Cell tracking: link per-frame label images into tracks with a lineage.

Frame to frame, cells are matched by overlap: the intersection-over-union of
every (previous, next) pair that overlaps feeds an optimal one-to-one assignment
(sparse Jonker-Volgenant, ``scipy.sparse.csgraph.min_weight_full_bipartite_matching``).
Only overlapping pairs are ever stored (at most one per pixel), so memory grows with
the pixels, never with cells x cells; pairs that do not overlap have IoU 0 and could
not change the optimum. Before the assignment, a previous
cell whose area is now covered by two smaller cells that overlap nobody else
as much is taken to have divided: it ends, and the two start as its
daughters. A cell the segmentation missed for up to ``max_gap`` frames keeps its
track: cells left unmatched are also matched, the same way, against the last-seen
masks of recently lost tracks. Cells still unmatched start new tracks.
Pure numpy/scipy, no I/O.

Lineage (Caliban/deepcell-tracking style), keyed by track id::

    {id: {"label": id, "frames": [t, ...], "parent": id | None,
          "daughters": [id, ...], "frame_div": t | None, "capped": bool}}

``capped`` is True when the track ends inside the movie (it divided or was lost).
``frames`` skips the frames of a bridged gap.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from kiosk_protocol.settings import Settings

__all__ = [
    "FrameOverlap",
    "TrackingParams",
    "TrackingResult",
    "bridge_gaps",
    "detect_divisions",
    "frame_overlap",
    "match_cells",
    "lineage_json",
    "track",
]


@dataclass(frozen=True)
class TrackingParams:
    """Thresholds of the linker.

    min_iou: a (prev, next) pair below this IoU is never linked.
    daughter_overlap: share of a daughter's area that must lie on its parent.
    division_iou: a cell whose best continuation reaches this IoU did not divide.
    daughter_area: allowed (min, max) of the two daughters' summed area / parent area.
    max_gap: frames a cell may be missing (a segmentation miss) and still keep its track.
    max_frames: longest stack tracked (MAX_IMAGE_FRAMES); 0 = no limit.
    max_cells: most cells one frame may have (MAX_CELLS_PER_FRAME), checked before any
    overlap: it bounds the work and the lineage of one job (overlaps and the assignment are
    sparse, so memory does not grow with cells x cells).
    """

    min_iou: float = 0.1
    daughter_overlap: float = 0.1
    division_iou: float = 0.5
    daughter_area: tuple[float, float] = (0.3, 3.0)
    max_gap: int = 2
    max_frames: int = Settings.max_image_frames
    max_cells: int = Settings.max_cells_per_frame


class TrackingTooLarge(ValueError):
    """A stack over MAX_IMAGE_FRAMES or a frame over MAX_CELLS_PER_FRAME (one-line message)."""


@dataclass(frozen=True)
class FrameOverlap:
    """Pixel overlap between the cells of two frames, as the list of pairs that overlap.

    ``rows[k]``, ``cols[k]`` index ``prev_ids`` / ``next_ids``; pairs are sorted by row, then
    column, and each occurs once.
    """

    prev_ids: np.ndarray  # (P,) label values of the previous frame
    next_ids: np.ndarray  # (N,) label values of the next frame
    rows: np.ndarray  # (K,) row of each overlapping pair
    cols: np.ndarray  # (K,) column of each overlapping pair
    pair_inter: np.ndarray  # (K,) intersecting pixels of each pair (> 0)
    prev_area: np.ndarray  # (P,)
    next_area: np.ndarray  # (N,)

    @property
    def pair_iou(self) -> np.ndarray:
        """(K,) IoU of each overlapping pair."""
        union = self.prev_area[self.rows] + self.next_area[self.cols] - self.pair_inter
        return self.pair_inter / np.maximum(union, 1)

    def _sparse(self, values: np.ndarray) -> Any:
        from scipy.sparse import csr_array

        return csr_array((values, (self.rows, self.cols)), shape=(len(self.prev_ids), len(self.next_ids)))

    @property
    def inter(self) -> Any:
        """(P, N) intersecting pixels as a scipy sparse array."""
        return self._sparse(self.pair_inter)

    @property
    def iou(self) -> Any:
        """(P, N) IoU as a scipy sparse array (pairs that do not overlap: 0)."""
        return self._sparse(self.pair_iou)


@dataclass
class TrackingResult:
    labels: np.ndarray  # (T, H, W) int32, one id per cell over time
    lineage: dict[int, dict[str, Any]] = field(default_factory=dict)

    @property
    def divisions(self) -> list[tuple[int, int, int]]:
        """(parent, daughter, daughter) for every detected division."""
        return [(cid, *info["daughters"]) for cid, info in sorted(self.lineage.items())
                if len(info["daughters"]) == 2]


def _compact(frame: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(sorted label values, index of each pixel's value): np.unique's answer without a sort.

    Label images are small non-negative integers, so a bincount lookup table is
    ~20x faster than sorting the pixels; huge label values fall back to np.unique.
    """
    flat = frame.ravel()
    top = int(flat.max()) if flat.size else 0
    if top > 4 * flat.size + 1024:
        ids, inv = np.unique(flat, return_inverse=True)
        return ids, inv.ravel()
    ids = np.flatnonzero(np.bincount(flat, minlength=1))
    lut = np.zeros(top + 1, dtype=np.intp)
    lut[ids] = np.arange(len(ids))
    return ids.astype(frame.dtype), lut[flat]


def frame_overlap(prev: np.ndarray, nxt: np.ndarray) -> FrameOverlap:
    """Intersections of every cell pair in one pass (bincount over joint labels)."""
    if prev.shape != nxt.shape:
        raise ValueError(f"frames differ in shape: {prev.shape} vs {nxt.shape}")
    prev_ids, prev_inv = _compact(prev)
    next_ids, next_inv = _compact(nxt)
    # Sparse: only the label pairs that occur (at most one per pixel), never P x N counters.
    codes, counts = np.unique(prev_inv.astype(np.int64) * len(next_ids) + next_inv, return_counts=True)
    rows, cols = np.divmod(codes, len(next_ids))
    prev_area = np.bincount(rows, weights=counts, minlength=len(prev_ids)).astype(np.int64)
    next_area = np.bincount(cols, weights=counts, minlength=len(next_ids)).astype(np.int64)
    keep_p, keep_n = prev_ids != 0, next_ids != 0
    row_of = np.cumsum(keep_p) - 1
    col_of = np.cumsum(keep_n) - 1
    pair = keep_p[rows] & keep_n[cols]
    return FrameOverlap(
        prev_ids=prev_ids[keep_p],
        next_ids=next_ids[keep_n],
        rows=row_of[rows[pair]],
        cols=col_of[cols[pair]],
        pair_inter=counts[pair].astype(np.int64),
        prev_area=prev_area[keep_p],
        next_area=next_area[keep_n],
    )


def detect_divisions(ov: FrameOverlap,
                     params: TrackingParams = TrackingParams()) -> dict[int, tuple[int, int]]:
    """Row index of each dividing parent -> column indices of its two daughters.

    A daughter must lie mostly on its parent (``daughter_overlap`` of its area,
    and more than on any other previous cell); the parent must have no good
    one-to-one continuation; the daughters' summed area must be plausible.
    """
    if len(ov.rows) == 0:
        return {}
    rows, cols, inter = ov.rows, ov.cols, ov.pair_inter
    best_iou = np.zeros(len(ov.prev_ids))
    np.maximum.at(best_iou, rows, ov.pair_iou)
    # The previous cell each next cell overlaps most (the first row on a tie).
    by_col = np.lexsort((rows, -inter, cols))
    first = by_col[np.r_[True, cols[by_col][1:] != cols[by_col][:-1]]]
    owner = np.full(len(ov.next_ids), -1, dtype=np.intp)
    owner[cols[first]] = rows[first]
    cand = (inter / np.maximum(ov.next_area[cols], 1) >= params.daughter_overlap) & (owner[cols] == rows)
    cand &= best_iou[rows] < params.division_iou
    # Candidates by row, the largest overlap first (the lower column on a tie).
    order = np.flatnonzero(cand)
    order = order[np.lexsort((cols[order], -inter[order], rows[order]))]
    result: dict[int, tuple[int, int]] = {}
    starts = np.flatnonzero(np.r_[True, rows[order][1:] != rows[order][:-1]]) if len(order) else []
    for i in starts:
        p = int(rows[order[i]])
        if i + 1 >= len(order) or rows[order[i + 1]] != p:
            continue  # one candidate: no division
        a, b = int(cols[order[i]]), int(cols[order[i + 1]])
        ratio = (ov.next_area[a] + ov.next_area[b]) / max(ov.prev_area[p], 1)
        if params.daughter_area[0] <= ratio <= params.daughter_area[1]:
            result[p] = (a, b)
    return result


def match_cells(ov: FrameOverlap, params: TrackingParams = TrackingParams(),
                skip_rows: set[int] | frozenset[int] = frozenset(),
                skip_cols: set[int] | frozenset[int] = frozenset()) -> list[tuple[int, int]]:
    """Optimal one-to-one (row, col) links maximising total IoU, each at least ``min_iou``.

    The optimum of the dense cells x cells assignment, found on the overlapping pairs only: a
    row may also stay unmatched (a private dummy column), which is what an IoU-0 link in the
    dense problem amounts to.
    """
    keep = np.ones(len(ov.rows), dtype=bool)
    if skip_rows:
        keep &= ~np.isin(ov.rows, np.fromiter(skip_rows, dtype=np.intp))
    if skip_cols:
        keep &= ~np.isin(ov.cols, np.fromiter(skip_cols, dtype=np.intp))
    if not keep.any():
        return []
    # ~0.3 s to import: not at worker start
    from scipy.sparse import csr_array
    from scipy.sparse.csgraph import min_weight_full_bipartite_matching

    iou = ov.pair_iou[keep]
    row_ids, r_local = np.unique(ov.rows[keep], return_inverse=True)
    col_ids, c_local = np.unique(ov.cols[keep], return_inverse=True)
    n_rows, n_cols = len(row_ids), len(col_ids)
    # Costs 2 - IoU on real pairs, 2 on each row's dummy: all non-zero (the solver drops zeros),
    # and minimising them maximises the summed IoU of the real links.
    graph = csr_array((np.r_[2.0 - iou, np.full(n_rows, 2.0)],
                       (np.r_[r_local, np.arange(n_rows)], np.r_[c_local, n_cols + np.arange(n_rows)])),
                      shape=(n_rows, n_cols + n_rows))
    r_idx, c_idx = min_weight_full_bipartite_matching(graph)
    real = c_idx < n_cols
    r_idx, c_idx = r_idx[real], c_idx[real]
    pair_codes = r_local.astype(np.int64) * n_cols + c_local  # sorted: pairs come row, then column
    link_iou = iou[np.searchsorted(pair_codes, r_idx.astype(np.int64) * n_cols + c_idx)]
    return [(int(row_ids[r]), int(col_ids[c])) for r, c, v in zip(r_idx, c_idx, link_iou, strict=True)
            if v >= params.min_iou]


def _new_entry(cid: int, parent: int | None) -> dict[str, Any]:
    return {"label": cid, "frames": [], "parent": parent, "daughters": [], "frame_div": None,
            "capped": False}


def track(labels: np.ndarray, params: TrackingParams | None = None) -> TrackingResult:
    """Track a (T, H, W) stack of per-frame label images.

    Returns the stack relabelled so that each cell keeps one id (1, 2, ... in
    order of first appearance) over time, plus its lineage.
    """
    params = TrackingParams() if params is None else params  # caps read now, not at import
    labels = np.asarray(labels)
    if labels.ndim != 3:
        raise ValueError(f"expected a (frames, height, width) label stack, got shape {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"label stack must be integers, got {labels.dtype}")
    if labels.size and labels.min() < 0:
        raise ValueError("label stack has negative labels")
    frames = labels.shape[0]
    if 0 < params.max_frames < frames:
        raise TrackingTooLarge(f"movie has {frames} frames, more than MAX_IMAGE_FRAMES ({params.max_frames})")
    if params.max_cells > 0:
        for t in range(frames):
            ids, _ = _compact(labels[t])
            cells = int(np.count_nonzero(ids))
            if cells > params.max_cells:
                raise TrackingTooLarge(f"frame {t} has {cells} cells, more than MAX_CELLS_PER_FRAME "
                                       f"({params.max_cells})")
    out = np.zeros(labels.shape, dtype=np.int32)
    lineage: dict[int, dict[str, Any]] = {}
    next_id = 1

    def start(parent: int | None) -> int:
        nonlocal next_id
        cid = next_id
        next_id += 1
        lineage[cid] = _new_entry(cid, parent)
        return cid

    # ids of the current frame's cells: frame label value -> track id
    current: dict[int, int] = {}
    lost: dict[int, int] = {}  # track id -> last frame it was seen, while a gap may still be bridged
    for t in range(frames):
        frame = labels[t]
        assigned: dict[int, int] = {}
        if t == 0:
            for value in np.unique(frame):
                if value:
                    assigned[int(value)] = start(None)
        else:
            ov = frame_overlap(labels[t - 1], frame)
            divisions = detect_divisions(ov, params)
            for p, (a, b) in divisions.items():
                parent = current[int(ov.prev_ids[p])]
                daughters = [start(parent), start(parent)]
                assigned[int(ov.next_ids[a])], assigned[int(ov.next_ids[b])] = daughters
                lineage[parent]["daughters"] = daughters
                lineage[parent]["frame_div"] = t
            used_cols = {c for pair in divisions.values() for c in pair}
            for r, c in match_cells(ov, params, set(divisions), used_cols):
                assigned[int(ov.next_ids[c])] = current[int(ov.prev_ids[r])]
            ended = {cid for cid in current.values() if not lineage[cid]["daughters"]} - set(assigned.values())
            lost.update((cid, t - 1) for cid in ended)
            lost = {cid: seen for cid, seen in lost.items() if t - seen - 1 <= params.max_gap}
            assigned.update(bridge_gaps(out, frame, lost, assigned, params))
            for cid in assigned.values():
                lost.pop(cid, None)
            for value in ov.next_ids.tolist():
                if int(value) not in assigned:
                    assigned[int(value)] = start(None)
        if assigned:
            ids, index = _compact(frame)  # no table sized by the largest label value
            track_of = np.zeros(len(ids), dtype=np.int32)
            for value, cid in assigned.items():
                track_of[np.searchsorted(ids, value)] = cid
                lineage[cid]["frames"].append(t)
            out[t] = track_of[index].reshape(frame.shape)
        current = assigned

    for info in lineage.values():
        info["capped"] = bool(info["daughters"]) or info["frames"][-1] < frames - 1
    return TrackingResult(out, lineage)


def bridge_gaps(out: np.ndarray, frame: np.ndarray, lost: dict[int, int], assigned: dict[int, int],
                params: TrackingParams = TrackingParams()) -> dict[int, int]:
    """Label value in ``frame`` -> lost track id it continues, for cells not yet ``assigned``.

    Each lost track is represented by its mask where it was last seen (``out`` holds the
    tracked frames so far); the overlap and optimal assignment are the frame-to-frame ones.
    """
    if not lost or params.max_gap <= 0:
        return {}
    memory = np.zeros(frame.shape, dtype=np.int32)
    for cid, seen in sorted(lost.items(), key=lambda item: item[1]):  # the most recent mask on top
        memory[out[seen] == cid] = cid
    ov = frame_overlap(memory, frame)
    taken = {c for c, value in enumerate(ov.next_ids.tolist()) if int(value) in assigned}
    return {int(ov.next_ids[c]): int(ov.prev_ids[r]) for r, c in match_cells(ov, params, skip_cols=taken)}


def lineage_json(lineage: dict[int, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """JSON-ready lineage (string keys, as json.dump would write them anyway)."""
    return {str(cid): dict(info) for cid, info in sorted(lineage.items())}
