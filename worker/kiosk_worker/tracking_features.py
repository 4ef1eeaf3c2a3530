"""Per-cell features the Kiosk's tracking models read, computed as deepcell-tracking computes them.

For every frame: each cell's centroid (row, col), morphology (area, perimeter, eccentricity),
appearance (the raw image under the cell's bounding box resized to ``appearance_dim`` squared in
``resize`` mode, or a fixed ``appearance_dim`` window around the centroid in ``fixed`` mode, whose
cell pixels are standardised when ``norm``), and an adjacency matrix of the cells whose centroids
lie closer than ``distance_threshold`` (self included), normalised as D^-1/2 A D^-1/2. Cells are
ordered by label value within a frame; frames are padded with zero rows to the movie's most
cells, which is what the neighborhood encoder expects. numpy/scikit-image only.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["FrameFeatures", "frame_features", "normalize_adjacency", "movie_features"]

#: epsilon of the degree matrix in the adjacency normalisation (deepcell-tracking's default)
ADJ_EPSILON = 1e-5


@dataclass
class FrameFeatures:
    """Features of the cells of one frame, in label order."""

    labels: np.ndarray  # (n,) int32 label values
    centroids: np.ndarray  # (n, 2) float32 row, col
    morphologies: np.ndarray  # (n, 3) float32 area, perimeter, eccentricity
    appearances: np.ndarray  # (n, A, A, C) float32


def frame_features(image: np.ndarray, labels: np.ndarray, appearance_dim: int = 32,
                   crop_mode: str = "resize", norm: bool = True) -> FrameFeatures:
    """Features of every cell of one (H, W, C) image and its (H, W) labels."""
    from skimage.transform import resize

    if crop_mode not in ("resize", "fixed"):
        raise ValueError(f"crop_mode must be 'resize' or 'fixed', got '{crop_mode}'")
    image = np.asarray(image, dtype=np.float32)
    if image.ndim == 2:
        image = image[..., np.newaxis]
    labels = np.asarray(labels, dtype=np.int32)
    dim = int(appearance_dim)
    if crop_mode == "fixed":
        pad = ((dim, dim), (dim, dim))
        image = np.pad(image, pad + ((0, 0),))
        labels = np.pad(labels, pad)
    ids, area, centroids, perimeter, eccentricity, boxes = region_measures(labels)
    n = len(ids)
    out = FrameFeatures(ids.astype(np.int32), centroids.astype(np.float32),
                        np.stack([area, perimeter, eccentricity], axis=-1).astype(np.float32).reshape(n, 3),
                        np.zeros((n, dim, dim, image.shape[-1]), np.float32))
    # In fixed mode the centroids are, as upstream's, those of the padded frame (a constant shift).
    for i in range(n):
        if crop_mode == "resize":
            crop = image[boxes[i]]
            out.appearances[i] = resize(crop, (dim, dim), order=1, mode="constant", preserve_range=True,
                                        anti_aliasing=False)
        else:
            half = dim // 2
            r, c = int(centroids[i, 0]), int(centroids[i, 1])
            crop = image[r - half:r + half, c - half:c + half, :].copy()
            if norm:
                crop *= (labels[r - half:r + half, c - half:c + half] == ids[i])[..., np.newaxis]
                idx = np.nonzero(crop)
                if len(idx[0]):
                    vals = crop[idx]
                    crop[idx] = (vals - vals.mean()) / (vals.std() + 1e-4)
            out.appearances[i] = crop
    return out


#: skimage.measure.perimeter's weights (4-neighbourhood) by the code of a border pixel: 1 for
#: itself, 2 per edge-adjacent and 10 per corner-adjacent border pixel of the same cell.
_PERIMETER_WEIGHTS = np.zeros(50)
_PERIMETER_WEIGHTS[[5, 7, 15, 17, 25, 27]] = 1
_PERIMETER_WEIGHTS[[21, 33]] = np.sqrt(2)
_PERIMETER_WEIGHTS[[13, 23]] = (1 + np.sqrt(2)) / 2


def _shifted(arr: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """arr[y + dy, x + dx] at (y, x), 0 outside the image."""
    out = np.zeros_like(arr)
    h, w = arr.shape
    out[max(-dy, 0):h - max(dy, 0), max(-dx, 0):w - max(dx, 0)] = \
        arr[max(dy, 0):h - max(-dy, 0), max(dx, 0):w - max(-dx, 0)]
    return out


def region_measures(labels: np.ndarray) -> tuple[np.ndarray, ...]:
    """(ids, area, centroids, perimeter, eccentricity, bounding-box slices) of every label, as
    skimage's regionprops measures them, for all cells in a few whole-image passes (regionprops
    costs milliseconds per cell)."""
    from scipy import ndimage

    flat = labels.ravel()
    counts = np.bincount(flat)
    ids = np.flatnonzero(counts)
    ids = ids[ids > 0]
    if not len(ids):
        empty = np.zeros(0)
        return ids, empty, np.zeros((0, 2)), empty, empty, []
    area = counts[ids].astype(np.float64)
    rows, cols = np.indices(labels.shape)

    def per_label(values: np.ndarray) -> np.ndarray:
        return np.bincount(flat, weights=values.ravel().astype(np.float64), minlength=len(counts))[ids] / area

    cy, cx = per_label(rows), per_label(cols)
    my = np.zeros(len(counts))
    mx = np.zeros(len(counts))
    my[ids], mx[ids] = cy, cx
    dy, dx = rows - my[labels], cols - mx[labels]
    a, c, b = per_label(dy * dy), per_label(dx * dx), per_label(dy * dx)
    half = np.sqrt(((a - c) / 2) ** 2 + b ** 2)
    l1 = np.maximum((a + c) / 2 + half, 0)
    l2 = np.maximum((a + c) / 2 - half, 0)
    ecc = np.where(l1 > 0, np.sqrt(1 - l2 / np.where(l1 > 0, l1, 1)), 0.0)
    # Border: cell pixels with a 4-neighbour outside the cell (or outside the image).
    border = labels > 0
    inner = border.copy()
    for oy, ox in ((1, 0), (-1, 0), (0, 1), (0, -1)):
        inner &= _shifted(labels, oy, ox) == labels
    border &= ~inner
    code = border.astype(np.int64)
    blab = np.where(border, labels, 0)
    for oy in (-1, 0, 1):
        for ox in (-1, 0, 1):
            if oy or ox:
                weight = 10 if oy and ox else 2
                code += weight * (border & (_shifted(blab, oy, ox) == labels))
    perimeter = np.bincount(flat, weights=np.where(border, _PERIMETER_WEIGHTS[np.minimum(code, 49)], 0).ravel(),
                            minlength=len(counts))[ids]
    objects = ndimage.find_objects(labels)
    boxes = [objects[i - 1] for i in ids]
    return ids, area, np.stack([cy, cx], axis=-1), perimeter, ecc, boxes


def normalize_adjacency(adj: np.ndarray, epsilon: float = ADJ_EPSILON) -> np.ndarray:
    """D^-1/2 A D^-1/2 of each (N, N) matrix of an (..., N, N) stack (degrees: row sums)."""
    adj = np.asarray(adj, dtype=np.float32)
    deg = (adj.sum(axis=-1) + epsilon) ** -0.5
    return (deg[..., :, np.newaxis] * adj * deg[..., np.newaxis, :]).astype(np.float32)


def adjacency(centroids: np.ndarray, distance_threshold: float) -> np.ndarray:
    """Binary (N, N) adjacency of a frame's padded centroids: closer than the threshold.

    Padding rows sit at (0, 0), as upstream leaves them, so they neighbour each other and any
    cell near the origin, exactly as deepcell-tracking's matrices do.
    """
    diff = centroids[:, np.newaxis, :] - centroids[np.newaxis, :, :]
    return (np.sqrt((diff.astype(np.float64) ** 2).sum(-1)) < distance_threshold).astype(np.float32)


def movie_features(movie: np.ndarray, labels: np.ndarray, appearance_dim: int = 32,
                   crop_mode: str = "resize", norm: bool = True
                   ) -> tuple[list[FrameFeatures], int]:
    """Features of every frame of a (T, H, W, C) movie and its (T, H, W) labels, and the most
    cells any frame has (the padded size of the encoder's inputs)."""
    frames = [frame_features(movie[t], labels[t], appearance_dim, crop_mode, norm)
              for t in range(labels.shape[0])]
    return frames, max((len(f.labels) for f in frames), default=0)


def padded(frames: list[FrameFeatures], start: int, stop: int, max_cells: int,
           distance_threshold: float) -> dict[str, np.ndarray]:
    """The neighborhood encoder's four inputs for frames ``start:stop``, zero-padded to
    ``max_cells`` cells, adjacency normalised."""
    sel = frames[start:stop]
    t = len(sel)
    dim = sel[0].appearances.shape[1] if sel else 1
    chans = sel[0].appearances.shape[-1] if sel else 1
    app = np.zeros((t, max_cells, dim, dim, chans), np.float32)
    morph = np.zeros((t, max_cells, 3), np.float32)
    cent = np.zeros((t, max_cells, 2), np.float32)
    adj = np.zeros((t, max_cells, max_cells), np.float32)
    for i, f in enumerate(sel):
        n = len(f.labels)
        app[i, :n], morph[i, :n], cent[i, :n] = f.appearances, f.morphologies, f.centroids
        adj[i] = adjacency(cent[i], distance_threshold)
    return {"encoder_app_input": app, "encoder_morph_input": morph, "encoder_centroid_input": cent,
            "encoder_adj_input": normalize_adjacency(adj)}
