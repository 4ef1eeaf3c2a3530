"""Which model runs a job, on which channels, at what scale: as the Kiosk's consumer decides.

Pure functions of a job hash and the settings (no I/O), following kiosk-redis-consumer
(``consumers/segmentation_consumer.py`` and ``consumers/base_consumer.py``):

* A job that names a model (``model_name``, optionally ``model_version``) runs that model on
  the channels its ``channels`` field picks: one step.
* A job that names none (the Kiosk frontend writes ``model_name=''``) is planned as upstream
  plans it: ``channels`` is split on commas and every filled entry at POSITION i runs
  ``MODEL_CHOICES[i]`` (``NUCLEAR_MODEL``, ``CYTOPLASM_MODEL``, ``PHASE_MODEL``) on that image
  channel; the label images are stacked as channels in position order. ``"0,"`` is one
  step (channel 0 through NUCLEAR_MODEL), ``",0"`` runs CYTOPLASM_MODEL on channel 0. An empty
  ``channels`` means ``"0"`` (upstream would fail such a job).
* The job's ``label`` is ignored, as upstream (its label detection, ``get_image_label``, is
  deprecated and never called), so LABEL_DETECT_MODEL / LABEL_DETECT_ENABLED change nothing.
* ``scale`` as upstream's ``get_image_scale``: '' means 1 (or detection when
  SCALE_DETECT_ENABLED, which this worker cannot do: the job fails saying so); otherwise a
  number within [MIN_SCALE, MAX_SCALE]. Upstream hands ``image_mpp = scale * model_mpp`` to
  the deepcell application, which resizes the image by ``scale`` before predicting and the
  labels back afterwards; the consumer does the same.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from kiosk_protocol.settings import Settings
from kiosk_worker.errors import BadImage, JobError, ModelMismatch

__all__ = [
    "CHOICE_VARIABLES",
    "ModelRef",
    "Step",
    "image_scale",
    "mesmer_model",
    "model_choices",
    "parse_channels",
    "plan",
    "scale_range",
    "tracking_model",
]

#: The variables naming the model of each ``channels`` position (upstream's MODEL_CHOICES).
CHOICE_VARIABLES = ("NUCLEAR_MODEL", "CYTOPLASM_MODEL", "PHASE_MODEL")


@dataclass(frozen=True)
class ModelRef:
    """A model to call; ``version`` '' asks for the latest. ``source`` says who chose it."""

    name: str
    version: str
    source: str = "the job"

    @classmethod
    def parse(cls, text: str, source: str) -> ModelRef:
        """``Name:version`` as the settings hold it (validated when they were loaded)."""
        name, _, version = text.partition(":")
        return cls(name, version, source)

    def __str__(self) -> str:
        return f"{self.name}:{self.version}" if self.version else self.name


@dataclass(frozen=True)
class Step:
    """One model call over the whole batch.

    ``channel`` is the one image channel an upstream-planned step feeds its model (None for
    a job-named model, which gets the channels ``fit_channels`` picks from ``channels``);
    ``position`` is its entry in the job's ``channels``.
    """

    model: ModelRef
    channel: int | None = None
    position: int | None = None


def model_choices(settings: Settings) -> tuple[ModelRef, ...]:
    """Upstream's MODEL_CHOICES: the model of channels position 0, 1 and 2."""
    values = (settings.nuclear_model, settings.cytoplasm_model, settings.phase_model)
    return tuple(ModelRef.parse(v, var) for v, var in zip(values, CHOICE_VARIABLES, strict=True))


def mesmer_model(settings: Settings) -> ModelRef:
    """MESMER_MODEL, defaulting to MULTIPLEX_MODEL (its deprecated name), as upstream."""
    if settings.mesmer_model:
        return ModelRef.parse(settings.mesmer_model, "MESMER_MODEL")
    return ModelRef.parse(settings.multiplex_model, "MULTIPLEX_MODEL")


def tracking_model(settings: Settings) -> ModelRef:
    """CALIBAN_MODEL, defaulting to TRACKING_MODEL, as upstream."""
    if settings.caliban_model:
        return ModelRef.parse(settings.caliban_model, "CALIBAN_MODEL")
    return ModelRef.parse(settings.tracking_model, "TRACKING_MODEL")


def parse_channels(text: str | None) -> list[int | None]:
    """``channels`` as the frontend writes it: '0,' -> [0, None]; '' -> []."""
    raw = (text or "").strip()
    if not raw:
        return []
    entries: list[int | None] = []
    for part in raw.split(","):
        part = part.strip()
        if not part:
            entries.append(None)
            continue
        try:
            index = int(part)
        except ValueError:
            raise BadImage(f"channels '{text}' must be comma-separated channel numbers") from None
        if index < 0:
            raise BadImage(f"channels '{text}' names a negative channel")
        entries.append(index)
    return entries


def plan(job: Mapping[str, str], settings: Settings, image_channels: int,
         default_channels: str = "0") -> list[Step]:
    """The model calls of a job whose image has ``image_channels`` channels (see module doc).

    Raises JobError (one line) for channels the image lacks or positions without a model.
    """
    name = (job.get("model_name") or "").strip()
    if name:
        return [Step(ModelRef(name, (job.get("model_version") or "").strip()))]
    text = job.get("channels") or ""
    entries = parse_channels(text) or parse_channels(default_channels)
    filled = [(pos, ch) for pos, ch in enumerate(entries) if ch is not None]
    if not filled:
        raise JobError(f"channels '{text}' names no channel to segment")
    if len(filled) > image_channels:  # upstream's check, before any model is called
        raise ModelMismatch(f"the image has {image_channels} channel(s) but channels '{text}' "
                            f"names {len(filled)}")
    choices = model_choices(settings)
    steps = []
    for pos, ch in filled:
        if ch >= image_channels:
            raise ModelMismatch(f"channels '{text}' asks for channel {ch} but the image has "
                                f"{image_channels}")
        if pos >= len(choices):
            raise JobError(f"channels '{text}' has an entry at position {pos}, which has no model: "
                           f"positions 0-{len(choices) - 1} run {', '.join(CHOICE_VARIABLES)}")
        steps.append(Step(choices[pos], ch, pos))
    return steps


def scale_range(settings: Settings) -> tuple[float, float]:
    """[MIN_SCALE, MAX_SCALE]; MIN_SCALE defaults to 1 / MAX_SCALE, as upstream."""
    high = settings.max_scale
    low = settings.min_scale if settings.min_scale is not None else 1.0 / high
    return low, high


def image_scale(raw: str | None, settings: Settings) -> float:
    """The job's ``scale`` as upstream's ``get_image_scale`` reads it."""
    text = (raw or "").strip()
    if not text:
        if settings.scale_detect_enabled:
            raise JobError("the job has no scale and scale detection (SCALE_DETECT_ENABLED) is not "
                           "supported by this worker: give the job a scale")
        return 1.0
    try:
        scale = float(text)
    except ValueError:
        raise JobError(f"scale '{raw}' is not a number") from None
    low, high = scale_range(settings)
    if not math.isfinite(scale) or not low <= scale <= high:
        raise JobError(f"scale {text} is outside the valid range [{low:g}, {high:g}] "
                       "(MIN_SCALE, MAX_SCALE)")
    return scale
