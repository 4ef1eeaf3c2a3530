"""Stand-in for the Kiosk's spot-detection model (``SpotDetection``, deepcell-spots) and its
ground truth.

Signature as deepcell-spots' dot_net_2D: one input ``input_1`` [N, H, W, 1] float32 (min-max
normalised by the consumer, as ``SpotDetection``'s preprocessing) and two outputs, read by
name by ``y_annotations_to_point_list_max``: ``classification`` [N, H, W, 2] (softmax; channel 1
= "a spot centre is in this pixel") and ``offset_regression`` [N, H, W, 2] (sub-pixel dy, dx from
the pixel to the spot centre).

The stand-in finds the spots of ``make_spots`` itself (smoothed local maxima above a fixed
level) and emits a near-1 classification at each spot's pixel with its intensity-weighted
centroid offset, so that upstream's post-processing recovers the spot coordinates.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from kiosk_model_server.models import Model, TensorSpec

__all__ = ["SpotModel", "make_spots", "spot_outputs"]

SPOT_SIGMA = 1.2
#: A smoothed, normalised pixel above this (and a local maximum) is a spot.
LEVEL = 0.3


@dataclass
class SpotModel(Model):
    """input_1 [N,H,W,1] float32 -> classification, offset_regression [N,H,W,2] float32."""

    tile: int | None = None

    def __post_init__(self) -> None:
        hw = self.tile if self.tile else -1
        self.inputs = {"input_1": TensorSpec("serving_default_input_1:0", "float32", (-1, hw, hw, 1))}
        self.outputs = {
            "classification": TensorSpec("StatefulPartitionedCall:0", "float32", (-1, hw, hw, 2)),
            "offset_regression": TensorSpec("StatefulPartitionedCall:1", "float32", (-1, hw, hw, 2)),
        }

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        batch = inputs["input_1"]
        cls = np.empty(batch.shape[:3] + (2,), dtype=np.float32)
        off = np.empty_like(cls)
        for i in range(batch.shape[0]):
            cls[i], off[i] = spot_outputs(batch[i, ..., 0])
        return {"classification": cls, "offset_regression": off}


def spot_outputs(frame: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(classification HxWx2, offset_regression HxWx2) of one normalised frame."""
    from skimage.feature import peak_local_max

    smooth = ndimage.gaussian_filter(frame.astype(np.float64), 1.0)
    peaks = peak_local_max(smooth, min_distance=2, threshold_abs=LEVEL, exclude_border=False)
    prob = np.full(frame.shape, 0.001, dtype=np.float32)
    off = np.zeros(frame.shape + (2,), dtype=np.float32)
    h, w = frame.shape
    for y, x in peaks:
        y0, y1, x0, x1 = max(y - 1, 0), min(y + 2, h), max(x - 1, 0), min(x + 2, w)
        win = np.clip(smooth[y0:y1, x0:x1] - smooth[y0:y1, x0:x1].min(), 0, None)
        if win.sum() > 0:
            yy, xx = np.mgrid[y0:y1, x0:x1]
            off[y, x] = ((yy * win).sum() / win.sum() - y, (xx * win).sum() / win.sum() - x)
        prob[y, x] = 0.999
    return np.stack([1.0 - prob, prob], axis=-1), off


def make_spots(shape: tuple[int, int] = (128, 128), n_spots: int = 40, seed: int = 0,
               min_gap: float = 5.0) -> tuple[np.ndarray, np.ndarray]:
    """A FISH-like image: ``(image float32 HxW, spot centres float64 (n, 2) as [y, x])``.

    Gaussian spots (sigma 1.2 px, amplitudes 0.5-1) at sub-pixel centres at least ``min_gap``
    apart and 3 px inside the border, on a dim noisy background.
    """
    rng = np.random.default_rng(seed)
    centres: list[tuple[float, float]] = []
    for _ in range(n_spots * 200):
        if len(centres) >= n_spots:
            break
        c = (rng.uniform(3, shape[0] - 3), rng.uniform(3, shape[1] - 3))
        if all(np.hypot(c[0] - y, c[1] - x) >= min_gap for y, x in centres):
            centres.append(c)
    yy, xx = np.mgrid[0:shape[0], 0:shape[1]]
    image = np.full(shape, 0.05, dtype=np.float64)
    for y, x in centres:
        image += rng.uniform(0.5, 1.0) * np.exp(-((yy - y) ** 2 + (xx - x) ** 2) / (2 * SPOT_SIGMA ** 2))
    image += rng.normal(0.0, 0.02, size=shape)
    return image.astype(np.float32), np.array(centres, dtype=np.float64).reshape(-1, 2)
