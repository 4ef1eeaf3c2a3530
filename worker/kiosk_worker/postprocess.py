"""Deep-watershed post-processing: model outputs -> integer label image.

As in DeepCell's deep_watershed: seeds are the peaks of the inner-distance
map, the mask is the thresholded foreground probability, and a watershed on
the negated inner distance grows one label per seed inside the mask.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["WatershedParams", "deep_watershed", "label_batch"]


@dataclass(frozen=True)
class WatershedParams:
    radius: int = 5                 # min distance between two seeds (pixels)
    maxima_threshold: float = 0.1   # inner distance a seed must exceed
    foreground_threshold: float = 0.5
    min_size: int = 10              # smaller objects are dropped


def deep_watershed(inner_distance: np.ndarray, foreground: np.ndarray,
                   params: WatershedParams | None = None) -> np.ndarray:
    """One HxW frame of each output -> int32 labels 1..k (0 = background)."""
    from skimage.feature import peak_local_max
    from skimage.morphology import remove_small_objects
    from skimage.segmentation import relabel_sequential, watershed

    p = params or WatershedParams()
    inner = np.asarray(inner_distance, dtype=np.float32)
    mask = np.asarray(foreground) > p.foreground_threshold
    if inner.shape != mask.shape:
        raise ValueError(f"inner_distance {inner.shape} and foreground {mask.shape} differ in shape")
    if not mask.any():  # nothing in the foreground (empty frames and tiles are common): no cells
        return np.zeros(inner.shape, dtype=np.int32)
    peaks = peak_local_max(inner, min_distance=p.radius, threshold_abs=p.maxima_threshold,
                           exclude_border=False, labels=mask.astype(np.int32))
    if not len(peaks):  # no seed, so the watershed labels nothing
        return np.zeros(inner.shape, dtype=np.int32)
    markers = np.zeros(inner.shape, dtype=np.int32)
    markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1, dtype=np.int32)
    labels = watershed(-inner, markers, mask=mask)
    if p.min_size > 1 and labels.any():
        # scikit-image 0.26: objects of max_size pixels or fewer are removed.
        labels = remove_small_objects(labels, max_size=p.min_size - 1)
    labels, _, _ = relabel_sequential(labels)
    return labels.astype(np.int32)


def label_batch(inner_distance: np.ndarray, foreground: np.ndarray,
                params: WatershedParams | None = None) -> np.ndarray:
    """(N, H, W[, 1]) outputs -> (N, H, W) int32 labels."""
    inner = np.asarray(inner_distance)
    fg = np.asarray(foreground)
    if inner.ndim == 4:
        inner = inner[..., 0]
    if fg.ndim == 4:
        fg = fg[..., -1]
    return np.stack([deep_watershed(inner[i], fg[i], params) for i in range(inner.shape[0])])
