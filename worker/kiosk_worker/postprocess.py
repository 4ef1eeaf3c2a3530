"""Deep-watershed post-processing: model outputs -> integer label images.

The algorithm, parameters and defaults of deepcell-toolbox's ``deep_watershed``
(deepcell_toolbox/deep_watershed.py at e8c1277), written with numpy, scipy and
scikit-image only (no TensorFlow, no deepcell import). Per frame:

1. smooth the maxima map (``inner_distance``) with a Gaussian of ``maxima_smooth`` and the
   interior map (``foreground``) with one of ``interior_smooth``;
2. widen the interior by ``pixel_expansion`` pixels (a grey dilation), if set;
3. seeds: ``h_maxima`` of the maxima map with height ``maxima_threshold`` and a disk of
   ``radius`` as footprint (default), or ``peak_local_max`` with ``min_distance=radius``,
   ``threshold_abs=maxima_threshold`` and ``exclude_border``; touching seeds are one label;
4. a watershed of the negated interior from those seeds, inside ``interior >
   interior_threshold``;
5. erode every label's edge by ``label_erosion`` pixels, drop objects smaller than
   ``small_objects_threshold`` pixels, fill holes smaller than ``fill_holes_threshold``
   pixels inside a label (each step only when its parameter is set); relabel 1..k.

One deliberate difference: upstream's hole filling also filled small corners of a label's
bounding box that lie outside it; here only holes enclosed by the label are filled.

Which model output is which: outputs named ``inner_distance`` and ``foreground`` (our
stand-in models) are used by name. Any other model's outputs are ordered by name, as the
Kiosk's gRPC model wrapper ordered them (kiosk-redis-consumer redis_consumer/grpc_clients.py,
``sorted(prediction.keys())``), and ``maxima_index`` / ``interior_index`` pick from that list
as in deepcell-toolbox. The maxima map is channel 0 of its output; the interior is channel 0
of a one-channel output, else channel 1 (the foreground or interior class of an fgbg or
pixelwise head, as deepcell's Mesmer application picks it: ``output[..., 1:2]``).

A job's ``postprocess_function`` field (the Kiosk frontend's hook) may be empty or
``deep_watershed``; anything else fails the job with a one-line reason. Parameters are set
per worker (POSTPROCESS_* settings, a ConsumerPool's ``spec.worker.postprocess``), never per
job: upstream has no per-job parameters either.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

import numpy as np

from kiosk_worker.errors import JobError, ModelMismatch

if TYPE_CHECKING:
    from kiosk_protocol.settings import Settings

__all__ = [
    "FOREGROUND",
    "INNER",
    "MAXIMA_ALGORITHMS",
    "POSTPROCESS_FUNCTIONS",
    "WatershedParams",
    "check_postprocess_function",
    "deep_watershed",
    "label_batch",
    "label_outputs",
    "params_for",
    "select_outputs",
]

INNER = "inner_distance"
FOREGROUND = "foreground"
MAXIMA_ALGORITHMS = ("h_maxima", "peak_local_max")
#: What a job's ``postprocess_function`` may name ('' means the default, deep_watershed).
POSTPROCESS_FUNCTIONS = ("deep_watershed",)
#: Settings attributes are ``postprocess_<field>`` (environment POSTPROCESS_<FIELD>).
SETTINGS_PREFIX = "postprocess_"


@dataclass(frozen=True)
class WatershedParams:
    """deepcell-toolbox ``deep_watershed`` keyword arguments, with its defaults."""

    radius: int = 10                    # disk footprint of h_maxima / min_distance of peak_local_max
    maxima_threshold: float = 0.1       # h of h_maxima / threshold_abs of peak_local_max
    interior_threshold: float = 0.01    # watershed mask: smoothed interior above this
    maxima_smooth: float = 0.0          # Gaussian sigma on the maxima map (0 = none)
    interior_smooth: float = 1.0        # Gaussian sigma on the interior map (0 = none)
    maxima_index: int = 0               # maxima output among outputs sorted by name
    interior_index: int = -1            # interior output among outputs sorted by name
    label_erosion: int = 0              # pixels eroded from every label's edge
    small_objects_threshold: int = 0    # objects with fewer pixels are removed (0 = keep all)
    fill_holes_threshold: int = 0       # holes with fewer pixels inside a label are filled
    pixel_expansion: int = 0            # interior widened by this many pixels (upstream None = 0)
    maxima_algorithm: str = "h_maxima"  # or peak_local_max (faster, worse on ambiguous maxima)
    exclude_border: bool = False        # peak_local_max only: no seeds within radius of the border

    def __post_init__(self) -> None:
        if self.maxima_algorithm not in MAXIMA_ALGORITHMS:
            raise ValueError(f"maxima_algorithm must be one of {', '.join(MAXIMA_ALGORITHMS)}, "
                             f"not {self.maxima_algorithm!r}")
        if self.radius < 1:
            raise ValueError(f"radius must be at least 1, not {self.radius}")
        for name in ("maxima_threshold", "maxima_smooth", "interior_smooth", "label_erosion",
                     "small_objects_threshold", "fill_holes_threshold", "pixel_expansion"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be zero or more, not {getattr(self, name)}")

    @classmethod
    def from_settings(cls, settings: Settings) -> WatershedParams:
        """The worker's POSTPROCESS_* settings (validated when they were loaded)."""
        return cls(**{f.name: getattr(settings, SETTINGS_PREFIX + f.name) for f in fields(cls)})


def check_postprocess_function(value: str | None) -> None:
    """Accept what a job's ``postprocess_function`` may say here, else raise a one-line JobError.

    The Kiosk consumer read the field as a comma-separated list of function names
    (kiosk-redis-consumer before f6707fa: settings.PROCESSING_FUNCTIONS['post']); since then
    it runs deep_watershed whatever the field says. This worker runs deep_watershed only, so
    it accepts '' and 'deep_watershed' (any case, once) and refuses the rest rather than
    silently ignoring a request it cannot honour.
    """
    names = [n.strip().lower() for n in str(value or "").split(",") if n.strip()]
    if not names or names == ["deep_watershed"]:
        return
    raise JobError(f"postprocess_function {str(value).strip()!r} is not supported: this worker "
                   "post-processes with deep_watershed only (leave the field empty or set deep_watershed)")


def params_for(settings: Settings, job: Mapping[str, str]) -> WatershedParams:
    """The parameters for one job: the worker's settings, after checking its postprocess_function."""
    check_postprocess_function(job.get("postprocess_function"))
    return WatershedParams.from_settings(settings)


def select_outputs(outputs: Mapping[str, np.ndarray],
                   params: WatershedParams | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(maxima, interior) model outputs: by name if named ours, else by index in name order."""
    p = params or WatershedParams()
    if INNER in outputs and FOREGROUND in outputs:
        return outputs[INNER], outputs[FOREGROUND]
    names = sorted(outputs)
    try:
        return outputs[names[p.maxima_index]], outputs[names[p.interior_index]]
    except IndexError:
        raise ModelMismatch(
            f"model outputs {names} have no output at maxima_index {p.maxima_index} or interior_index "
            f"{p.interior_index} (outputs named '{INNER}' and '{FOREGROUND}' are used by name)") from None


def label_outputs(outputs: Mapping[str, np.ndarray], params: WatershedParams | None = None) -> np.ndarray:
    """Model outputs of a batch -> (N, H, W) int32 labels."""
    maxima, interior = select_outputs(outputs, params)
    return label_batch(maxima, interior, params)


def label_batch(inner_distance: np.ndarray, foreground: np.ndarray,
                params: WatershedParams | None = None) -> np.ndarray:
    """(N, H, W[, C]) maxima and interior outputs -> (N, H, W) int32 labels."""
    maxima = _frames(inner_distance, interior=False)
    interior = _frames(foreground, interior=True)
    if maxima.shape != interior.shape:
        raise ModelMismatch(f"maxima output {tuple(np.shape(inner_distance))} and interior output "
                            f"{tuple(np.shape(foreground))} differ in shape")
    return np.stack([deep_watershed(maxima[i], interior[i], params) for i in range(maxima.shape[0])])


def _frames(arr: np.ndarray, interior: bool) -> np.ndarray:
    """(N, H, W) from (H, W), (N, H, W) or (N, H, W, C), picking the channel as documented."""
    arr = np.asarray(arr)
    if arr.ndim == 2:
        return arr[np.newaxis]
    if arr.ndim == 4:
        return arr[..., 1] if interior and arr.shape[-1] > 1 else arr[..., 0]
    if arr.ndim != 3:
        raise ModelMismatch(f"model output of rank {arr.ndim}; deep watershed takes [batch, height, "
                            "width, channels] (2D images)")
    return arr


def deep_watershed(inner_distance: np.ndarray, foreground: np.ndarray,
                   params: WatershedParams | None = None) -> np.ndarray:
    """One HxW frame of the maxima and interior maps -> int32 labels 1..k (0 = background)."""
    from scipy import ndimage
    from skimage.feature import peak_local_max
    from skimage.measure import label
    from skimage.morphology import dilation, disk, h_maxima
    from skimage.segmentation import relabel_sequential, watershed

    p = params or WatershedParams()
    maxima, interior = _float(inner_distance), _float(foreground)
    if maxima.shape != interior.shape or maxima.ndim != 2:
        raise ValueError(f"inner_distance {maxima.shape} and foreground {interior.shape} must be "
                         "2D frames of the same shape")
    maxima = ndimage.gaussian_filter(maxima, p.maxima_smooth)
    interior = ndimage.gaussian_filter(interior, p.interior_smooth)
    if p.pixel_expansion:
        side = 2 * p.pixel_expansion + 1
        interior = dilation(interior, footprint=np.ones((side, side), dtype=np.uint8))

    if p.maxima_algorithm == "peak_local_max":
        coords = peak_local_max(maxima, min_distance=p.radius, threshold_abs=p.maxima_threshold,
                                exclude_border=p.exclude_border)
        peaks = np.zeros(maxima.shape, dtype=bool)
        peaks[tuple(coords.T)] = True
    else:
        peaks = h_maxima(maxima, p.maxima_threshold, footprint=disk(p.radius)).astype(bool)
    markers = label(peaks)
    if not markers.any():  # no seed (empty frames and tiles are common): no cells
        return np.zeros(maxima.shape, dtype=np.int32)
    labels = watershed(-interior, markers, mask=interior > p.interior_threshold, watershed_line=False)

    if p.label_erosion:
        labels = _erode_edges(labels, p.label_erosion)
    if p.small_objects_threshold and labels.any():
        from skimage.morphology import remove_small_objects

        with warnings.catch_warnings():  # "only one label": a single cell is a fine result
            warnings.simplefilter("ignore", UserWarning)
            # scikit-image 0.26 removes objects of max_size pixels or fewer; upstream's
            # min_size removed those smaller than it.
            labels = remove_small_objects(labels, max_size=p.small_objects_threshold - 1)
    if p.fill_holes_threshold:
        labels = _fill_holes(labels, p.fill_holes_threshold)
    labels, _, _ = relabel_sequential(labels)
    return labels.astype(np.int32)


def _float(arr: Any) -> np.ndarray:
    arr = np.asarray(arr)
    return arr if np.issubdtype(arr.dtype, np.floating) else arr.astype(np.float32)


def _erode_edges(labels: np.ndarray, width: int) -> np.ndarray:
    """deepcell_toolbox.utils.erode_edges: clear each label's inner boundary ``width`` times."""
    from skimage.segmentation import find_boundaries

    out = labels.copy()
    for _ in range(width):
        out[find_boundaries(out, mode="inner")] = 0
    return out


def _fill_holes(labels: np.ndarray, size: int) -> np.ndarray:
    """deepcell_toolbox.utils.fill_holes: holes of fewer than ``size`` pixels that lie completely
    within a label (Euler number < 1) take its label.

    Upstream looks for holes in the label's bounding box, so a corner of the box outside a
    small label also counted as a "hole" and was filled; the box is padded by one pixel here,
    so that only holes enclosed by the label are filled, as upstream's own comment says.
    """
    from skimage.measure import regionprops
    from skimage.morphology import remove_small_holes

    out = labels.copy()
    for prop in regionprops(labels.astype(np.int64), cache=False):
        if prop.euler_number < 1:
            patch = out[prop.slice]
            mine = np.pad(patch == prop.label, 1)
            # scikit-image 0.26: holes of max_size pixels or fewer; upstream's area_threshold
            # filled those smaller than it.
            filled = remove_small_holes(mine, max_size=size - 1, connectivity=1)[1:-1, 1:-1]
            out[prop.slice] = np.where(filled, prop.label, patch)
    return out
