"""The deepcell ``Application`` around a model call, per model family (numpy/scipy/scikit-image).

Upstream consumers never send raw pixels: they hand the image to a deepcell-tf application
(deepcell/applications/application.py at f1839a4), which

1. resizes the image by ``image_mpp / model_mpp`` (the Kiosk passes ``image_mpp = scale *
   model_mpp``, so by the job's ``scale``),
2. pre-processes it (``preprocessing_fn``),
3. tiles it to the model's input size with overlap, runs the model, untiles with blending
   (``kiosk_worker.tiling``),
4. post-processes the outputs (deep watershed with the application's keyword arguments),
5. resizes the labels back to the input's size.

The families and their choices, as the applications define them:

* nuclear: model_mpp 0.65, histogram_normalization (CLAHE), deep_watershed's defaults;
* cytoplasm (also phase): model_mpp 0.65, histogram_normalization, deep_watershed's defaults;
* mesmer: model_mpp 0.5, percentile_threshold(99.9) then histogram_normalization, Mesmer's
  whole-cell deep_watershed arguments;
* none: no pre-processing (raw float32), the worker's POSTPROCESS_* settings.

Which family a model belongs to: APPLICATION_MODELS (``Name=family,...``) first, then APPLICATION
when it names a family, else by name (``Nuclear`` -> nuclear, ``Cyto``/``Phase`` -> cytoplasm,
``Mesmer``/``Multiplex`` -> mesmer), else nuclear (histogram normalization is what every
single-channel deepcell segmentation application does).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from typing import TYPE_CHECKING, Any

import numpy as np

from kiosk_worker.postprocess import WatershedParams

if TYPE_CHECKING:
    from kiosk_protocol.settings import Settings

__all__ = [
    "APPLICATIONS",
    "FAMILIES",
    "Application",
    "application_for",
    "histogram_normalization",
    "mesmer_preprocess",
    "percentile_threshold",
]


def histogram_normalization(image: np.ndarray, kernel_size: int | None = None) -> np.ndarray:
    """deepcell_toolbox.processing.histogram_normalization: per frame and channel, rescale to
    0..1 and apply CLAHE (kernel 1/8 of the image by default); constant channels become zeros."""
    from skimage.exposure import equalize_adapthist, rescale_intensity

    image = np.array(image, dtype=np.float32, copy=True)
    for b in range(image.shape[0]):
        for c in range(image.shape[-1]):
            x = image[b, ..., c]
            if not np.isfinite(x).all():
                x = np.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)
            if (x == x.flat[0]).all():
                image[b, ..., c] = 0.0
                continue
            x = rescale_intensity(x, out_range=(0.0, 1.0))
            image[b, ..., c] = equalize_adapthist(x, kernel_size=kernel_size)
    return image


def percentile_threshold(image: np.ndarray, percentile: float = 99.9) -> np.ndarray:
    """deepcell_toolbox.processing.percentile_threshold: clip each frame and channel at the
    ``percentile`` of its non-zero values (blank channels stay zero)."""
    out = np.zeros_like(image, dtype=np.float32)
    for b in range(image.shape[0]):
        for c in range(image.shape[-1]):
            x = np.array(image[b, ..., c], dtype=np.float32)
            nonzero = x[np.nonzero(x)]
            if nonzero.size:
                out[b, ..., c] = np.minimum(x, np.percentile(nonzero, percentile))
    return out


def mesmer_preprocess(image: np.ndarray, percentile: float = 99.9) -> np.ndarray:
    """deepcell-tf mesmer_preprocess: percentile clipping, then histogram normalization."""
    return histogram_normalization(percentile_threshold(image, percentile))


def _raw(image: np.ndarray) -> np.ndarray:
    return image.astype(np.float32, copy=False)


@dataclass(frozen=True)
class Application:
    """What a deepcell application does around its model (see the module doc)."""

    family: str
    model_mpp: float | None
    preprocess: Callable[[np.ndarray], np.ndarray]
    #: deep_watershed keyword arguments the application passes (over deep_watershed's defaults).
    postprocess_kwargs: Mapping[str, Any] = field(default_factory=dict)

    def watershed(self, worker: WatershedParams) -> WatershedParams:
        """The application's kwargs; a POSTPROCESS_* setting that differs from deep_watershed's
        default (the pool set it) wins over them."""
        base = WatershedParams()
        chosen = dict(self.postprocess_kwargs)
        for f in fields(WatershedParams):
            if getattr(worker, f.name) != getattr(base, f.name):
                chosen[f.name] = getattr(worker, f.name)
        return replace(base, **chosen)


#: Mesmer's whole-cell deep_watershed arguments (deepcell-tf mesmer.py, compartment 'whole-cell').
MESMER_WHOLE_CELL = {"maxima_threshold": 0.075, "maxima_smooth": 0.0, "interior_threshold": 0.2,
                     "interior_smooth": 2.0, "small_objects_threshold": 15, "fill_holes_threshold": 15,
                     "radius": 2}

APPLICATIONS: dict[str, Application] = {
    "nuclear": Application("nuclear", 0.65, histogram_normalization),
    "cytoplasm": Application("cytoplasm", 0.65, histogram_normalization),
    "mesmer": Application("mesmer", 0.5, mesmer_preprocess, MESMER_WHOLE_CELL),
    "none": Application("none", None, _raw),
}
FAMILIES = tuple(APPLICATIONS)

_BY_NAME = (("mesmer", "mesmer"), ("multiplex", "mesmer"), ("nuclear", "nuclear"),
            ("cyto", "cytoplasm"), ("phase", "cytoplasm"))


def parse_models(text: str) -> dict[str, str]:
    """APPLICATION_MODELS: ``Name=family,Name2=family`` -> {name: family}; raises ValueError."""
    out: dict[str, str] = {}
    for part in (text or "").split(","):
        part = part.strip()
        if not part:
            continue
        name, sep, family = part.partition("=")
        name, family = name.strip(), family.strip().lower()
        if not sep or not name or family not in APPLICATIONS:
            raise ValueError(f"entry {part!r} must be ModelName=family with family one of "
                             f"{', '.join(FAMILIES)}")
        out[name] = family
    return out


def application_for(model_name: str, settings: Settings | None = None) -> Application:
    """The application (family) that wraps ``model_name`` on this worker (see the module doc)."""
    mapping = parse_models(getattr(settings, "application_models", "") or "")
    if model_name in mapping:
        return APPLICATIONS[mapping[model_name]]
    chosen = (getattr(settings, "application", "") or "").strip().lower()
    if chosen and chosen != "auto":
        return APPLICATIONS[chosen]
    lowered = model_name.lower()
    for needle, family in _BY_NAME:
        if needle in lowered:
            return APPLICATIONS[family]
    return APPLICATIONS["nuclear"]
