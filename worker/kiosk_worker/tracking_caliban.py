"""Model-driven tracking as the Kiosk's caliban consumer runs it (deepcell-tracking's CellTracker).

1. Features of every cell of every frame (``tracking_features``) go through the neighborhood
   encoder, which returns one embedding per cell.
2. Frame by frame, every track that has not divided (its last ``track_length`` embeddings and
   centroids, the last one repeated when the track is shorter) and the new frame's cells go
   through the tracking inference model, which scores each (track, cell) pair as
   [same, different, daughter] probabilities.
3. The assignment: the (tracks + cells) square cost matrix of upstream (1 - p_same for links,
   ``birth`` / ``death`` on the diagonals of the birth and death blocks, 1 off them, the links'
   transpose in the bottom-right block) solved by linear_sum_assignment. A cell left unlinked
   starts a track; its parent is the undivided track whose daughter probability for it is the
   highest above ``division``. A parent that also continued into the frame hands that cell to a
   new daughter track; a parent is capped and never links again.

Tracks that were not seen for a while stay candidates (the model decides), so a cell missed by
the segmentation keeps its track. The models are callables (gRPC in the worker, anything in
tests). Above ``dense_limit`` tracks + cells the assignment is solved sparsely on the links
cheaper than a birth plus a death (cost 2 (1 - p_same) each, as the dense problem pairs them),
so memory does not grow with their product. The lineage is upstream's lineage.json:
``{label: {label, frames, daughters, capped, frame_div, parent}}`` with ``capped`` true for a
track that divided.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from kiosk_protocol.settings import Settings
from kiosk_worker import tracking_features
from kiosk_worker.tracking import TrackingResult, TrackingTooLarge, _compact

__all__ = ["CalibanParams", "Encoder", "Inference", "check_caps", "solve_assignment", "track_with_models"]

#: inputs of the neighborhood encoder -> (frames, cells, embedding) embeddings
Encoder = Callable[[dict[str, np.ndarray]], np.ndarray]
#: inputs of the inference model -> (1, 1, tracks, cells, 3) probabilities
Inference = Callable[[dict[str, np.ndarray]], np.ndarray]


@dataclass(frozen=True)
class CalibanParams:
    """The caliban consumer's tracker settings (MAX_DISTANCE, APPEARANCE_DIM, BIRTH, DEATH,
    DIVISION, TRACK_LENGTH, CROP_MODE, CALIBAN_NORM) and the job caps."""

    distance_threshold: float = Settings.max_distance
    appearance_dim: int = Settings.appearance_dim
    birth: float = Settings.birth
    death: float = Settings.death
    division: float = Settings.division
    track_length: int = Settings.track_length
    crop_mode: str = Settings.crop_mode
    norm: bool = Settings.caliban_norm
    max_frames: int = Settings.max_image_frames
    max_cells: int = Settings.max_cells_per_frame
    #: tracks + cells of a frame up to which the dense (upstream) assignment is solved
    dense_limit: int = 1024

    @classmethod
    def from_settings(cls, s: Settings) -> CalibanParams:
        """The tracker settings a worker was started with."""
        return cls(s.max_distance, s.appearance_dim, s.birth, s.death, s.division, s.track_length,
                   s.crop_mode, s.caliban_norm, s.max_image_frames, s.max_cells_per_frame)


@dataclass
class _Track:
    frames: list[int] = field(default_factory=list)
    cells: list[int] = field(default_factory=list)  # cell index within each frame
    parent: int | None = None
    daughters: list[int] = field(default_factory=list)
    capped: bool = False
    frame_div: int | None = None


def check_caps(labels: np.ndarray, max_frames: int, max_cells: int) -> None:
    """Raise TrackingTooLarge over MAX_IMAGE_FRAMES frames or MAX_CELLS_PER_FRAME cells in a frame,
    before any feature is computed."""
    if labels.ndim != 3:
        raise ValueError(f"expected a (frames, height, width) label stack, got shape {labels.shape}")
    if 0 < max_frames < labels.shape[0]:
        raise TrackingTooLarge(f"movie has {labels.shape[0]} frames, more than MAX_IMAGE_FRAMES ({max_frames})")
    if max_cells > 0:
        for t in range(labels.shape[0]):
            ids, _ = _compact(labels[t])
            if int(np.count_nonzero(ids)) > max_cells:
                raise TrackingTooLarge(f"frame {t} has {int(np.count_nonzero(ids))} cells, more than "
                                       f"MAX_CELLS_PER_FRAME ({max_cells})")


def embed(frames: list[tracking_features.FrameFeatures], max_cells: int, encoder: Encoder,
          distance_threshold: float, batch_bytes: int = 64 << 20) -> list[np.ndarray]:
    """Each frame's (cells, E) embeddings, frames sent in batches of at most ``batch_bytes`` of
    input (at least one frame per request)."""
    per_frame = 4 * max_cells * (max_cells + 5 + int(np.prod(frames[0].appearances.shape[1:])))
    step = max(1, batch_bytes // max(per_frame, 1))
    out: list[np.ndarray] = []
    for start in range(0, len(frames), step):
        inputs = tracking_features.padded(frames, start, start + step, max_cells, distance_threshold)
        emb = np.asarray(encoder(inputs), dtype=np.float32)
        n_frames = inputs["encoder_morph_input"].shape[0]
        if emb.ndim != 3 or emb.shape[:2] != (n_frames, max_cells):
            raise ValueError(f"the neighborhood encoder returned embeddings of shape {list(emb.shape)}; "
                             f"expected [{n_frames}, {max_cells}, E]")
        out.extend(emb[i, :len(frames[start + i].labels)] for i in range(n_frames))
    return out


def solve_assignment(links: np.ndarray, birth: float, death: float, dense_limit: int = 1024
                     ) -> list[tuple[int, int]]:
    """(row, col) pairs of upstream's LAP for a (tracks, cells) matrix of link costs: rows
    0..tracks-1 are tracks, rows from ``tracks`` are births; cols below ``cells`` are cells."""
    n_tracks, n_cells = links.shape
    if n_tracks + n_cells <= dense_limit:
        from scipy.optimize import linear_sum_assignment

        size = n_tracks + n_cells
        cost = np.ones((size, size), dtype=np.float64)
        cost[:n_tracks, :n_cells] = links
        cost[n_tracks:, :n_cells] += np.diag(np.full(n_cells, birth - 1.0))
        cost[:n_tracks, n_cells:] += np.diag(np.full(n_tracks, death - 1.0))
        cost[n_tracks:, n_cells:] = links.T
        rows, cols = linear_sum_assignment(cost)
        return [(int(r), int(c)) for r, c in zip(rows, cols, strict=True) if c < n_cells]
    from scipy.sparse import csr_array
    from scipy.sparse.csgraph import min_weight_full_bipartite_matching

    # A link costs 2 * (1 - p) in the dense problem (its cell and its mirror in the bottom-right
    # block), leaving a track and a cell costs death + birth: only cheaper links can be chosen.
    r, c = np.nonzero(2.0 * links < birth + death)
    # Tracks 0..T-1 and births T..T+C-1 (rows) against cells and deaths (cols); every real cost is
    # shifted by 1 so that none is zero (the solver drops explicit zeros).
    rows = np.r_[r, n_tracks + np.arange(n_cells), np.arange(n_tracks)]
    cols = np.r_[c, np.arange(n_cells), n_cells + np.arange(n_tracks)]
    vals = np.r_[2.0 * links[r, c], np.full(n_cells, birth), np.full(n_tracks, death)] + 1.0
    # Births of cells that are linked leave their row with a death column of a linked track: the
    # mirror pairs, free here (their price is already in the link's doubled cost).
    rows = np.r_[rows, n_tracks + c]
    cols = np.r_[cols, n_cells + r]
    vals = np.r_[vals, np.ones(len(r))]
    graph = csr_array((vals, (rows, cols)), shape=(n_tracks + n_cells,) * 2)
    rr, cc = min_weight_full_bipartite_matching(graph)
    return sorted((int(a), int(b)) for a, b in zip(rr, cc, strict=True) if b < n_cells)


def track_with_models(movie: np.ndarray, labels: np.ndarray, encoder: Encoder, inference: Inference,
                      params: CalibanParams | None = None) -> TrackingResult:
    """Track a (T, H, W) label stack of a (T, H, W[, C]) movie with the two tracking models."""
    params = CalibanParams() if params is None else params
    labels = np.asarray(labels)
    if not np.issubdtype(labels.dtype, np.integer) or (labels.size and labels.min() < 0):
        raise ValueError("label stack must hold non-negative integers")
    check_caps(labels, params.max_frames, params.max_cells)
    movie = np.asarray(movie, dtype=np.float32)
    if movie.ndim == 3:
        movie = movie[..., np.newaxis]
    if movie.shape[:3] != labels.shape:
        raise ValueError(f"movie {movie.shape[:3]} and labels {labels.shape} differ in shape")
    frames, max_cells = tracking_features.movie_features(movie, labels, params.appearance_dim,
                                                         params.crop_mode, params.norm)
    n_frames = labels.shape[0]
    if max_cells == 0:
        return TrackingResult(np.zeros(labels.shape, np.int32), {})
    emb = embed(frames, max_cells, encoder, params.distance_threshold)
    cents = [f.centroids for f in frames]
    tracks: list[_Track] = []
    owner: list[np.ndarray] = [np.full(len(f.labels), -1, dtype=np.intp) for f in frames]

    def new_track(t: int, cell: int) -> int:
        tracks.append(_Track(frames=[t], cells=[cell]))
        owner[t][cell] = len(tracks) - 1
        return len(tracks) - 1

    def history(k: int, source: list[np.ndarray]) -> np.ndarray:
        tr = tracks[k]
        picks = list(zip(tr.frames, tr.cells, strict=True))[-params.track_length:]
        picks += [picks[-1]] * (params.track_length - len(picks))
        return np.stack([source[f][c] for f, c in picks])

    for cell in range(len(frames[0].labels)):
        new_track(0, cell)
    for t in range(1, n_frames):
        n = len(frames[t].labels)
        if n == 0:
            continue
        active = [k for k, tr in enumerate(tracks) if not tr.capped]
        if active:
            inputs = {
                "current_embeddings": np.stack([history(k, emb) for k in active], axis=1)[np.newaxis],
                "current_centroids": np.stack([history(k, cents) for k in active], axis=1)[np.newaxis],
                "future_embeddings": emb[t][np.newaxis, np.newaxis],
                "future_centroids": cents[t][np.newaxis, np.newaxis],
            }
            pred = np.asarray(inference(inputs), dtype=np.float32)
            if pred.shape != (1, 1, len(active), n, 3):
                raise ValueError(f"the tracking model returned shape {list(pred.shape)}; expected "
                                 f"[1, 1, {len(active)}, {n}, 3]")
            pred = pred[0, 0]
        else:
            pred = np.zeros((0, n, 3), np.float32)
        for row, cell in solve_assignment(1.0 - pred[..., 0], params.birth, params.death, params.dense_limit):
            if row < len(active):
                k = active[row]
                tracks[k].frames.append(t)
                tracks[k].cells.append(cell)
                owner[t][cell] = k
                continue
            born = new_track(t, cell)
            best, parent = params.division, None
            for idx, k in enumerate(active):
                if tracks[k].capped or tracks[k].frames == [t]:
                    continue
                if pred[idx, cell, 2] > best:
                    best, parent = pred[idx, cell, 2], k
            if parent is not None:
                tracks[born].parent = parent
                tracks[parent].daughters.append(born)
        for k in range(len(tracks)):
            tr = tracks[k]
            if not tr.daughters:
                continue
            if not tr.capped:
                tr.frame_div, tr.capped = t, True
            if tr.frames and tr.frames[-1] == t:  # it also continued: that cell is a daughter too
                cell = tr.cells.pop()
                tr.frames.pop()
                d = new_track(t, cell)
                tracks[d].parent = k
                tr.daughters.append(d)

    out = np.zeros(labels.shape, dtype=np.int32)
    for t in range(n_frames):
        if not len(frames[t].labels):
            continue
        ids, index = _compact(labels[t])
        table = np.zeros(len(ids), dtype=np.int32)
        table[np.searchsorted(ids, frames[t].labels)] = owner[t] + 1
        out[t] = table[index].reshape(labels[t].shape)
    lineage: dict[int, dict[str, Any]] = {
        k + 1: {"label": k + 1, "frames": list(tr.frames), "daughters": [d + 1 for d in tr.daughters],
                "capped": tr.capped, "frame_div": tr.frame_div,
                "parent": None if tr.parent is None else tr.parent + 1}
        for k, tr in enumerate(tracks)}
    return TrackingResult(out, lineage)
