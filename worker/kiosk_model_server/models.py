"""Built-in deterministic models for kiosk-model-server (numpy/scipy only).

``segmentation`` mimics a deep-watershed network: it outputs a foreground
probability and an inner-distance map whose peaks sit at cell centres, so the
worker's real post-processing (markers from inner_distance peaks, mask from
foreground > 0.5, watershed) recovers the cells of ``synthetic.make_cells``, provided
the worker ran the deepcell application pipeline (``kiosk_worker.pipeline``) around the call:
like the real models it expects histogram-normalized input at the model's resolution and
answers with no cells otherwise (``segment_frame``).
``null`` has the same signature but returns zeros, for throughput benchmarks;
``identity`` echoes its input.

The Kiosk's default model names (``KIOSK_MODELS``: NuclearSegmentation, CytoplasmSegmentation,
PhaseCytoSegmentation, MultiplexSegmentation) are aliases of these stand-ins that also serve
the version the Kiosk's consumer asks for by default (NUCLEAR_MODEL=NuclearSegmentation:6 ...),
so a worker with no model settings finds them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

__all__ = [
    "KIOSK_MODELS",
    "Degraded",
    "IdentityModel",
    "InputError",
    "Model",
    "NullModel",
    "SegmentationModel",
    "TensorSpec",
    "build_model",
]


log = logging.getLogger(__name__)


class InputError(ValueError):
    """The request does not match the model's signature (-> INVALID_ARGUMENT)."""


@dataclass(frozen=True)
class TensorSpec:
    """One signature entry: graph tensor name, numpy dtype, shape (-1 = any)."""

    name: str
    dtype: str
    shape: tuple[int, ...]


@dataclass
class Model:
    """Base model: a signature plus ``run``; ``check`` validates requests like TF Serving."""

    name: str
    versions: tuple[int, ...] = (1,)
    inputs: dict[str, TensorSpec] = field(default_factory=dict)
    outputs: dict[str, TensorSpec] = field(default_factory=dict)

    def check(self, inputs: dict[str, np.ndarray]) -> None:
        """Raise InputError unless ``inputs`` match the signature in keys, dtype and shape."""
        missing = sorted(set(self.inputs) - set(inputs))
        extra = sorted(set(inputs) - set(self.inputs))
        if missing or extra:
            raise InputError(f"input aliases {sorted(inputs)} do not match signature "
                             f"{sorted(self.inputs)}")
        for alias, spec in self.inputs.items():
            arr = inputs[alias]
            if arr.dtype != np.dtype(spec.dtype):
                raise InputError(f"input '{alias}' must be {spec.dtype}, got {arr.dtype}")
            if arr.ndim != len(spec.shape):
                raise InputError(f"input '{alias}' must have rank {len(spec.shape)} "
                                 f"{list(spec.shape)}, got shape {list(arr.shape)}")
            for want, got in zip(spec.shape, arr.shape, strict=True):
                if want >= 0 and want != got:
                    raise InputError(f"input '{alias}' must have shape {list(spec.shape)}, "
                                     f"got {list(arr.shape)}")

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        raise NotImplementedError


def _image_signature(channels: int, tile: int | None) -> dict[str, TensorSpec]:
    hw = tile if tile else -1
    return {"image": TensorSpec("serving_default_image:0", "float32", (-1, hw, hw, channels))}


def _seg_outputs(tile: int | None) -> dict[str, TensorSpec]:
    hw = tile if tile else -1
    return {
        "foreground": TensorSpec("StatefulPartitionedCall:0", "float32", (-1, hw, hw, 1)),
        "inner_distance": TensorSpec("StatefulPartitionedCall:1", "float32", (-1, hw, hw, 1)),
    }


class Degraded(Exception):
    """The input is not what the model was trained on; the stand-in answers with no cells."""


#: What the stand-ins were "trained" on: deepcell's histogram normalization (CLAHE) output, 0..1
#: spanning the whole range, of cells whose equivalent radius lies in this range (pixels) at the
#: model's resolution (``model_mpp``).
TRAINED_RANGE = (-0.01, 1.01)
TRAINED_RADIUS = (4.5, 26.0)
#: Intensity of the normalized input above which the stand-in sees cells.
THRESHOLD = 0.45
RIM_THRESHOLD = 0.25
RIM = 1


def check_normalized(image: np.ndarray) -> None:
    """Raise Degraded unless ``image`` looks like histogram_normalization output: finite values in
    0..1 that use the range (max near 1, a dark background). All zeros (a blank channel, which
    the normalization turns into zeros) is fine."""
    if not np.isfinite(image).all():
        raise Degraded("input holds NaN or infinite values")
    low, high = float(image.min()), float(image.max())
    if low == high == 0.0:
        return
    if low < TRAINED_RANGE[0] or high > TRAINED_RANGE[1]:
        raise Degraded(f"input spans {low:g}..{high:g}, not the 0..1 of histogram normalization")
    if high < 0.9 or float(np.percentile(image, 1)) > 0.1:
        raise Degraded(f"input spans {low:g}..{high:g} without using the 0..1 range of histogram "
                       "normalization")


def check_resolution(cells: np.ndarray) -> None:
    """Raise Degraded if the cells found are much smaller or larger than at the model's resolution."""
    # Cells cut by the frame's edge (tiles cut many) say nothing about the resolution.
    edge = np.unique(np.concatenate([cells[0], cells[-1], cells[:, 0], cells[:, -1]]))
    areas = np.bincount(cells.ravel())
    areas[edge] = 0
    areas = areas[1:]
    areas = areas[areas > 0]
    if not areas.size:
        return
    radius = float(np.sqrt(np.median(areas) / np.pi))
    if not TRAINED_RADIUS[0] <= radius <= TRAINED_RADIUS[1]:
        raise Degraded(f"cells of median radius {radius:.1f} px; the model expects "
                       f"{TRAINED_RADIUS[0]:g}-{TRAINED_RADIUS[1]:g} px (resize to model_mpp)")


def segment_frame(image: np.ndarray, threshold: float = THRESHOLD) -> tuple[np.ndarray, np.ndarray]:
    """(foreground = interior probability, inner distance) of one HxW frame, shaped like a DeepCell
    model's outputs so that deepcell-toolbox's deep_watershed with its defaults recovers the cells.

    Like a real DeepCell model, it expects its input pre-processed as the deepcell application
    does (histogram normalization to 0..1) and resized to the model's resolution: otherwise
    (``check_normalized``, ``check_resolution``) it degrades and answers with no cells, so a
    worker that skips a pipeline step finds nothing. For normalized input it finds the cells
    itself (fixed threshold, brightness-weighted distance, watershed) and then emits what
    DeepCell models are trained to output for them (deepcell-tf transform_utils): an inner
    distance of 1 / (1 + 0.1 * squared distance to the cell's centre), and an interior map that
    is ~1 at least ``INTERIOR_INSET`` pixels inside a cell and ~0 elsewhere (deep_watershed's
    Gaussian blur and 0.01 threshold grow it back to the edge). A fixed threshold rather than
    per-image statistics, so that tiles of one image give the same answer as the whole image.
    """
    try:
        check_normalized(image)
        return _segment(image, threshold)
    except Degraded as err:
        log.warning("stand-in model degraded: %s", err)
        zeros = np.zeros(image.shape, dtype=np.float32)
        return zeros, zeros.copy()


def _segment(image: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    from skimage.feature import peak_local_max
    from skimage.measure import regionprops
    from skimage.segmentation import find_boundaries, watershed

    smooth = ndimage.gaussian_filter(image.astype(np.float64), 1.0)
    # Cells are regions above ``threshold``, grown by up to ``RIM`` pixels into their dimmer rim
    # (above ``RIM_THRESHOLD``): CLAHE lifts background noise of small images close to the rims.
    mask = smooth > threshold
    if RIM:
        mask = ndimage.binary_dilation(mask, iterations=RIM, mask=smooth > RIM_THRESHOLD)
    dist = ndimage.distance_transform_edt(mask) * np.clip(smooth, 0.0, None) ** 2
    ridge = np.tanh(ndimage.gaussian_filter(dist, 1.5) / 6.0) * mask
    peaks = peak_local_max(ridge, min_distance=5, threshold_abs=0.1, exclude_border=False,
                           labels=mask.astype(np.int32))
    markers = np.zeros(mask.shape, dtype=np.int32)
    markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1, dtype=np.int32)
    cells = watershed(-ridge, markers, mask=mask) if len(peaks) else markers
    check_resolution(cells)
    inner = np.zeros(mask.shape, dtype=np.float32)
    for prop in regionprops(cells):
        # Centred on the cell's pixel nearest its centroid, so that every cell peaks at exactly 1.
        d2 = ((prop.coords - prop.centroid) ** 2).sum(axis=1)
        d2 = ((prop.coords - prop.coords[np.argmin(d2)]) ** 2).sum(axis=1)
        inner[tuple(prop.coords.T)] = 1.0 / (1.0 + 0.1 * d2)
    interior = cells > 0
    for _ in range(INTERIOR_INSET):
        interior &= ~find_boundaries(np.where(interior, cells, 0), mode="inner")
    foreground = np.where(interior, 0.98, 0.002)
    return foreground.astype(np.float32), inner


#: Pixels between a cell's edge and its interior in the stand-in's foreground output.
INTERIOR_INSET = 3


@dataclass
class SegmentationModel(Model):
    """Input image [N,H,W,C] float32 (channel 0 used); outputs [N,H,W,1] float32."""

    channels: int = 1
    tile: int | None = None

    def __post_init__(self) -> None:
        self.inputs = _image_signature(self.channels, self.tile)
        self.outputs = _seg_outputs(self.tile)

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        batch = inputs["image"]
        fg = np.empty(batch.shape[:3] + (1,), dtype=np.float32)
        inner = np.empty_like(fg)
        for i in range(batch.shape[0]):
            fg[i, ..., 0], inner[i, ..., 0] = segment_frame(batch[i, ..., 0])
        return {"foreground": fg, "inner_distance": inner}


@dataclass
class NullModel(SegmentationModel):
    """Segmentation signature, all-zero outputs: measures everything but the model."""

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        shape = inputs["image"].shape[:3] + (1,)
        zeros = np.zeros(shape, dtype=np.float32)
        return {"foreground": zeros, "inner_distance": zeros}


@dataclass
class IdentityModel(Model):
    """Returns its input 'image' (any rank, float32) as 'output'."""

    def __post_init__(self) -> None:
        self.inputs = {"image": TensorSpec("serving_default_image:0", "float32", (-1, -1, -1, -1))}
        self.outputs = {"output": TensorSpec("Identity:0", "float32", (-1, -1, -1, -1))}

    def check(self, inputs: dict[str, np.ndarray]) -> None:
        if set(inputs) != {"image"}:
            raise InputError(f"input aliases {sorted(inputs)} do not match signature ['image']")
        if inputs["image"].dtype != np.float32:
            raise InputError(f"input 'image' must be float32, got {inputs['image'].dtype}")

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {"output": inputs["image"]}


#: The Kiosk consumer's default models (its settings.py): name -> (stand-in kind, version).
KIOSK_MODELS: dict[str, tuple[str, int]] = {
    "NuclearSegmentation": ("segmentation", 6),
    "CytoplasmSegmentation": ("segmentation", 5),
    "PhaseCytoSegmentation": ("segmentation", 0),
    "MultiplexSegmentation": ("mesmer-panoptic", 9),
    "SpotDetection": ("spot", 3),
    "NuclearTrackingInf": ("tracking-inference", 6),
    "NuclearTrackingNE": ("tracking-encoder", 6),
}


def build_model(kind: str, name: str | None = None, versions: tuple[int, ...] = (1,),
                tile: int | None = None, channels: int | None = None) -> Model:
    """Model by kind: segmentation (1 channel), mesmer (2 channels), null, identity, or one of
    ``KIOSK_MODELS`` (its stand-in, serving ``versions`` plus the Kiosk's default version)."""
    name = name or kind
    if kind in KIOSK_MODELS:
        kind, default_version = KIOSK_MODELS[kind]
        versions = tuple(sorted({*versions, default_version}))
    if kind == "segmentation":
        return SegmentationModel(name, versions, channels=channels or 1, tile=tile)
    if kind == "mesmer":
        return SegmentationModel(name, versions, channels=channels or 2, tile=tile)
    if kind == "mesmer-panoptic":  # deepcell's Mesmer signature (mesmer_model.py)
        from kiosk_model_server.mesmer_model import MesmerModel

        return MesmerModel(name, versions, tile=tile)
    if kind == "spot":  # deepcell-spots' SpotDetection signature (spot_model.py)
        from kiosk_model_server.spot_model import SpotModel

        return SpotModel(name, versions, tile=tile)
    if kind in ("tracking-inference", "tracking-encoder"):  # deepcell-tf's GNNTrackingModel (tracking_model.py)
        from kiosk_model_server.tracking_model import NeighborhoodEncoderModel, TrackingInferenceModel

        return (TrackingInferenceModel if kind == "tracking-inference" else NeighborhoodEncoderModel)(name, versions)
    if kind == "null":
        return NullModel(name, versions, channels=channels or 1, tile=tile)
    if kind == "identity":
        return IdentityModel(name, versions)
    raise ValueError(f"unknown model kind '{kind}' (segmentation, mesmer, mesmer-panoptic, spot, "
                     "tracking-inference, tracking-encoder, null, identity, "
                     f"{', '.join(KIOSK_MODELS)})")
