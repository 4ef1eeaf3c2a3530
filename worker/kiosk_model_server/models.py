"""Built-in deterministic models for kiosk-model-server (numpy/scipy only).

``segmentation`` mimics a deep-watershed network: it outputs a foreground
probability and an inner-distance map whose peaks sit at cell centres, so the
worker's real post-processing (markers from inner_distance peaks, mask from
foreground > 0.5, watershed) recovers the cells of ``synthetic.make_cells``.
``null`` has the same signature but returns zeros, for throughput benchmarks;
``identity`` echoes its input.

The Kiosk's default model names (``KIOSK_MODELS``: NuclearSegmentation, CytoplasmSegmentation,
PhaseCytoSegmentation, MultiplexSegmentation) are aliases of these stand-ins that also serve
the version the Kiosk's consumer asks for by default (NUCLEAR_MODEL=NuclearSegmentation:6 ...),
so a worker with no model settings finds them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

__all__ = [
    "KIOSK_MODELS",
    "IdentityModel",
    "InputError",
    "Model",
    "NullModel",
    "SegmentationModel",
    "TensorSpec",
    "build_model",
]


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


def _intensity_scale(image: np.ndarray) -> float:
    """Images arrive as 0..1 floats, or as 8/16-bit intensities cast to float."""
    top = float(image.max()) if image.size else 0.0
    if top <= 1.5:
        return 1.0
    return 255.0 if top <= 255.0 else 65535.0


def segment_frame(image: np.ndarray, threshold: float = 0.15) -> tuple[np.ndarray, np.ndarray]:
    """(foreground = interior probability, inner distance) of one HxW frame, shaped like a DeepCell
    model's outputs so that deepcell-toolbox's deep_watershed with its defaults recovers the cells.

    The stand-in finds the cells itself (threshold, brightness-weighted distance, watershed) and
    then emits what DeepCell models are trained to output for them (deepcell-tf
    transform_utils): an inner distance of 1 / (1 + 0.1 * squared distance to the cell's centre),
    and an interior map that is ~1 at least ``INTERIOR_INSET`` pixels inside a cell and ~0
    elsewhere (deep_watershed's Gaussian blur and 0.01 threshold grow it back to the edge).
    Fixed intensity thresholds rather than per-image statistics, so that tiles of one image
    give the same answer as the whole image.
    """
    from skimage.feature import peak_local_max
    from skimage.measure import regionprops
    from skimage.segmentation import find_boundaries, watershed

    smooth = ndimage.gaussian_filter(image.astype(np.float64) / _intensity_scale(image), 1.0)
    mask = smooth > threshold
    dist = ndimage.distance_transform_edt(mask) * np.clip(smooth, 0.0, None) ** 2
    ridge = np.tanh(ndimage.gaussian_filter(dist, 1.5) / 6.0) * mask
    peaks = peak_local_max(ridge, min_distance=5, threshold_abs=0.1, exclude_border=False,
                           labels=mask.astype(np.int32))
    markers = np.zeros(mask.shape, dtype=np.int32)
    markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1, dtype=np.int32)
    cells = watershed(-ridge, markers, mask=mask) if len(peaks) else markers
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
    "MultiplexSegmentation": ("mesmer", 9),
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
    if kind == "null":
        return NullModel(name, versions, channels=channels or 1, tile=tile)
    if kind == "identity":
        return IdentityModel(name, versions)
    raise ValueError(f"unknown model kind '{kind}' (segmentation, mesmer, null, identity, "
                     f"{', '.join(KIOSK_MODELS)})")
