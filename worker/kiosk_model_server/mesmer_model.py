"""Stand-in for the Kiosk's Mesmer model (``MultiplexSegmentation:9``) and its ground truth.

Signature as deepcell-tf's Mesmer (a PanopticNet): one input ``input_0`` [N, H, W, 2] float32
(nuclear, membrane) and four semantic heads, which deepcell's ``format_output_mesmer`` reads in
name order: ``semantic_0`` whole-cell inner distance [N, H, W, 1], ``semantic_1`` whole-cell
pixelwise [N, H, W, 3] (channel 1 = interior), ``semantic_2`` nuclear inner distance,
``semantic_3`` nuclear pixelwise.

The stand-in finds nuclei in channel 0 and cells in channel 1 itself (``find_objects``) and
emits what the trained heads output for them, so Mesmer's deep-watershed post-processing
recovers ``make_tissue``'s labels. Like a real model it expects Mesmer's pre-processing
(percentile clipping and histogram normalization) and answers with no cells otherwise.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace

import numpy as np
from scipy import ndimage

from kiosk_model_server.models import Model, TensorSpec
from kiosk_model_server.synthetic import _default_radius, _place, _render

__all__ = ["OUTPUTS", "MesmerModel", "find_objects", "heads_for", "make_tissue"]

log = logging.getLogger(__name__)

#: Normalized intensity above which the stand-in sees a cell or nucleus (Mesmer's CLAHE'd
#: input has a brighter background than the single-channel models').
THRESHOLD = 0.42

#: A nucleus's radius relative to its cell's in ``make_tissue``.
NUCLEUS_FRACTION = 0.55

#: Output alias -> (compartment, head kind), in the order format_output_mesmer reads them.
OUTPUTS = {
    "semantic_0": ("whole-cell", "inner_distance"),
    "semantic_1": ("whole-cell", "pixelwise"),
    "semantic_2": ("nuclear", "inner_distance"),
    "semantic_3": ("nuclear", "pixelwise"),
}


@dataclass
class MesmerModel(Model):
    """input_0 [N,H,W,2] float32 -> semantic_0..3 float32 (see module doc)."""

    tile: int | None = None

    def __post_init__(self) -> None:
        hw = self.tile if self.tile else -1
        self.inputs = {"input_0": TensorSpec("serving_default_input_0:0", "float32", (-1, hw, hw, 2))}
        self.outputs = {
            alias: TensorSpec(f"StatefulPartitionedCall:{i}", "float32",
                              (-1, hw, hw, 1 if kind == "inner_distance" else 3))
            for i, (alias, (_, kind)) in enumerate(OUTPUTS.items())}

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        batch = inputs["input_0"]
        n, h, w, _ = batch.shape
        out = {alias: np.zeros((n, h, w, spec.shape[-1]), dtype=np.float32)
               for alias, spec in self.outputs.items()}
        for i in range(n):
            for channel, (inner_alias, pixel_alias) in ((1, ("semantic_0", "semantic_1")),
                                                        (0, ("semantic_2", "semantic_3"))):
                inner, interior = heads_for(find_objects(batch[i, ..., channel]))
                out[inner_alias][i, ..., 0] = inner
                out[pixel_alias][i, ..., 1] = np.where(interior, 0.98, 0.002)
                out[pixel_alias][i, ..., 2] = np.where(interior, 0.002, 0.98)
        return out


def normalized(frame: np.ndarray) -> bool:
    """Whether ``frame`` looks like histogram normalization output (0..1 using the range), or is
    blank; anything else is not what the model was trained on."""
    if not np.isfinite(frame).all():
        return False
    low, high = float(frame.min()), float(frame.max())
    return (low == high == 0.0) or (-0.01 <= low and high <= 1.01 and high >= 0.9)


def find_objects(frame: np.ndarray) -> np.ndarray:
    """Labels of the cells (or nuclei) of one normalized frame; none if it is not normalized.
    Fixed thresholds, so that tiles of an image give the answer of the whole image."""
    from skimage.feature import peak_local_max
    from skimage.segmentation import watershed

    if not normalized(frame):
        log.warning("Mesmer stand-in degraded: input is not histogram-normalized "
                    "(%g..%g)", float(np.nanmin(frame)), float(np.nanmax(frame)))
        return np.zeros(frame.shape, dtype=np.int32)
    smooth = ndimage.gaussian_filter(frame.astype(np.float64), 1.0)
    mask = smooth > THRESHOLD
    dist = ndimage.distance_transform_edt(mask) * np.clip(smooth, 0.0, None) ** 2
    ridge = np.tanh(ndimage.gaussian_filter(dist, 1.5) / 6.0) * mask
    peaks = peak_local_max(ridge, min_distance=4, threshold_abs=0.1, exclude_border=False,
                           labels=mask.astype(np.int32))
    markers = np.zeros(mask.shape, dtype=np.int32)
    markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1, dtype=np.int32)
    return watershed(-ridge, markers, mask=mask) if len(peaks) else markers


def heads_for(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(inner distance, interior mask) a trained Mesmer head outputs for these objects: inner
    distance 1 / (1 + 0.1 * squared distance to the object's central pixel) (deepcell-tf
    transform_utils), interior = the object minus its one-pixel rim."""
    from skimage.measure import regionprops
    from skimage.segmentation import find_boundaries

    inner = np.zeros(labels.shape, dtype=np.float32)
    for prop in regionprops(labels):
        d2 = ((prop.coords - prop.centroid) ** 2).sum(axis=1)
        d2 = ((prop.coords - prop.coords[np.argmin(d2)]) ** 2).sum(axis=1)
        inner[tuple(prop.coords.T)] = 1.0 / (1.0 + 0.1 * d2)
    interior = (labels > 0) & ~find_boundaries(labels, mode="inner")
    return inner, interior


def make_tissue(shape: tuple[int, int] = (256, 256), n_cells: int = 20, seed: int = 0,
                radius: float | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A two-channel (nuclear, membrane) image with ground truth:
    ``(image float32 HxWx2, whole-cell labels int32 HxW, nuclear labels int32 HxW)``.

    The cells (channel 1) are ``synthetic.make_cells``' for the same arguments; each cell's
    nucleus (channel 0, same label) is the same ellipse at ``NUCLEUS_FRACTION`` of its size,
    rendered the same way. ``radius`` (pixels) sets the typical cell size, as in make_cells.
    """
    shape = (int(shape[0]), int(shape[1]))
    rng = np.random.default_rng(seed)
    cells = _place(rng, shape, n_cells, True, float(radius) if radius else _default_radius(shape, n_cells))
    membrane, labels = _render(shape, cells, rng)
    nuclei = [replace(c, radius=c.radius * NUCLEUS_FRACTION) for c in cells]
    nuclear, nuclear_labels = _render(shape, nuclei, np.random.default_rng(seed + 1_000_003))
    return np.stack([nuclear, membrane], axis=-1), labels, nuclear_labels
