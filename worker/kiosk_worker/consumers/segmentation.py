"""The segmentation consumer (CONSUMER_TYPE ``segmentation``, alias ``image``).

download -> header check and decode -> (N, H, W, C) with the job's
dimension_order -> which models on which channels (``model_choice``: the job's
model, else NUCLEAR_MODEL / CYTOPLASM_MODEL / PHASE_MODEL by ``channels`` position,
as the Kiosk's consumer) -> resize by the job's ``scale`` -> validate against each
model's signature -> the model family's pre-processing (``pipeline``: histogram
normalization, Mesmer's percentile clipping) -> tile with overlap if the model has a fixed
input size -> Predict in batches -> blended untiling -> deep watershed with the family's
arguments -> labels resized back -> label TIFFs -> zip -> upload -> done, with
``object_count`` (labels in the result) in the job hash. Labels keep the input's
orientation; several models give one label image per channel position, stacked in position
order.

Status order: started, pre-processing, predicting, post-processing,
saving-results, done (the Kiosk's, with post-processing in between).
"""

from __future__ import annotations

from typing import Any

import numpy as np

import kiosk_protocol as protocol
from kiosk_worker import imaging, model_choice, pipeline, results, tiling
from kiosk_worker.consumers.base import TensorFlowServingConsumer
from kiosk_worker.errors import JobError, ModelMismatch
from kiosk_worker.model_choice import Step
from kiosk_worker.postprocess import WatershedParams, label_outputs, params_for

__all__ = ["SegmentationConsumer"]

INNER = "inner_distance"
FOREGROUND = "foreground"


class SegmentationConsumer(TensorFlowServingConsumer):
    """Single images through a deep-watershed model; one zip of label TIFFs per job."""

    watershed = WatershedParams()
    tile_overlap = 0.25
    #: ``channels`` of a job that names no model and leaves ``channels`` empty.
    default_channels = "0"

    def _consume(self, redis_hash: str) -> str:
        labels, stem = self.segment_channels(redis_hash)
        self.set_status(redis_hash, protocol.SAVING_RESULTS)
        data = results.zip_arrays_bytes(self.result_members(labels, stem))
        with self.timed("upload_time"):
            dest, url = self.storage.upload_data(data, f"{stem}.zip")
        self.finish_fields.update(output_url=url, output_file_name=dest, total_jobs=1,
                                  object_count=str(object_count(labels)))
        return self.final_status

    def segment(self, redis_hash: str) -> tuple[np.ndarray, str]:
        """Download, load, predict and post-process the job's input: ((N, H, W) labels, stem).

        Shared by every consumer that segments before doing its own saving (e.g. tracking);
        statuses run from pre-processing to post-processing. The job must run one model
        (``segment_channels`` for several).
        """
        labels, stem = self.segment_channels(redis_hash)
        if labels.shape[-1] != 1:
            raise JobError(f"channels '{self.job.get('channels', '')}' runs {labels.shape[-1]} models; "
                           f"this consumer takes one label image per frame: name one channel")
        return labels[..., 0], stem

    def segment_channels(self, redis_hash: str) -> tuple[np.ndarray, str]:
        """As ``segment``, with one label channel per model call: ((N, H, W, K) labels, stem)."""
        from kiosk_worker.tfs.client import ModelNotFound

        job = self.job
        input_name = job.get("input_file_name", "")
        if not input_name:
            raise JobError("the job names no input file (input_file_name is empty)")

        self.set_status(redis_hash, protocol.PRE_PROCESSING)
        with self.timed("download_time"):
            local = self.storage.readable_path(input_name, self.tempdir)  # read only
        image = self.load(local, job)
        _, height, width, _ = image.shape
        steps = self.plan(job, image)
        scale = model_choice.image_scale(job.get("scale"), self.settings)
        image = imaging.rescale(image, scale, self.settings.max_image_height, self.settings.max_image_width)

        calls = []
        for step in steps:
            model = step.model
            try:
                inputs = self.get_model_metadata(model.name, model.version)
            except ModelNotFound as err:
                if model.source == "the job":
                    raise
                raise JobError(f"{err} (the job names no model; {model.source} chose it for "
                               f"channels position {step.position})") from None
            part = image if step.channel is None else image[..., step.channel:step.channel + 1]
            channels = job.get("channels", "") if step.channel is None else ""
            part, tile = self.fit_model(part, inputs, channels, model.name)
            app = pipeline.application_for(model.name, self.settings)
            calls.append((model, app.preprocess(part), tile, app))

        # Upstream writes back the scale it used when the job had none.
        given = (job.get("scale") or "").strip()
        self.set_status(redis_hash, protocol.PREDICTING, **({} if given else {"scale": f"{scale:g}"}))
        outputs = [self.predict(part, model.name, model.version, tile) for model, part, tile, _ in calls]

        self.set_status(redis_hash, protocol.POST_PROCESSING)
        labels = [imaging.resize_labels(self.postprocess(out, call[3]), height, width)
                  for out, call in zip(outputs, calls, strict=True)]
        return np.stack(labels, axis=-1), results.result_stem(job.get("original_name") or input_name)

    # -- steps (overridable) -------------------------------------------------
    def load(self, local_path: str, job: dict[str, str]) -> np.ndarray:
        """Decoded image as (N, H, W, C), size-checked from its header first."""
        order = job.get("dimension_order", "")
        raw = imaging.load_image(local_path, self.settings.max_image_height,
                                 self.settings.max_image_width, order,
                                 max_decoded_bytes=self.settings.max_decoded_bytes)
        return imaging.to_nhwc(raw, order)

    def plan(self, job: dict[str, str], image: np.ndarray) -> list[Step]:
        """The model calls for this job's (N, H, W, C) image (``model_choice.plan``)."""
        return model_choice.plan(job, self.settings, image.shape[-1], self.default_channels)

    def result_members(self, labels: np.ndarray, stem: str) -> dict[str, np.ndarray]:
        """Zip members of (N, H, W, K) labels, named as the Kiosk named them (results.label_members)."""
        return results.label_members(labels, stem)

    def fit_model(self, image: np.ndarray, inputs: dict[str, dict[str, Any]], channels: str,
                  model_name: str) -> tuple[np.ndarray, tuple[int, int] | None]:
        """Match channels and rank to the signature; returns the image and the fixed tile size."""
        alias = self.input_alias(inputs)
        shape = inputs[alias]["shape"]
        if shape is not None and len(shape) != 4:
            raise ModelMismatch(
                f"model '{model_name}' takes rank-{len(shape)} input; the segmentation consumer "
                "sends 2D images as [batch, height, width, channels]")
        model_channels = shape[3] if shape is not None and shape[3] > 0 else None
        image = imaging.fit_channels(image, channels, model_channels,
                                      max_entries=self.settings.max_channel_entries)
        tile = (shape[1], shape[2]) if shape is not None and shape[1] > 0 and shape[2] > 0 else None
        return image.astype(np.float32, copy=False), tile

    def predict(self, image: np.ndarray, model_name: str, model_version: str,
                tile: tuple[int, int] | None) -> dict[str, np.ndarray]:
        """Model outputs for the whole batch, tiled and stitched when the model input is fixed."""
        _, h, w, _ = image.shape
        if tile is None or not tiling.needs_tiling(h, w, *tile):
            return self.batched(image, model_name, model_version)
        tiles, plan = tiling.tile_image(image, tile[0], tile[1], self.tile_overlap)
        outputs = self.batched(tiles, model_name, model_version)
        return {name: tiling.untile(out, plan) for name, out in outputs.items()
                if out.ndim >= 3 and out.shape[0] == plan.count}

    def batched(self, batch: np.ndarray, model_name: str, model_version: str) -> dict[str, np.ndarray]:
        """``grpc_image`` in requests of ``batch_size`` items (upstream's GrpcModelWrapper
        batching), outputs concatenated."""
        inputs = self.get_model_metadata(model_name, model_version)
        size = batch_size(inputs[self.input_alias(inputs)]["shape"], self.settings.tf_max_batch_size,
                          self.settings.tf_min_model_size)
        if batch.shape[0] <= size:
            return self.grpc_image(batch, model_name, model_version)
        parts = [self.grpc_image(batch[i:i + size], model_name, model_version)
                 for i in range(0, batch.shape[0], size)]
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    def postprocess(self, outputs: dict[str, np.ndarray],
                    app: pipeline.Application | None = None) -> np.ndarray:
        """Deep watershed with the application's arguments (POSTPROCESS_* settings that differ
        from deep_watershed's defaults win); the worker's settings alone without an application."""
        params = params_for(self.settings, self.job)
        return label_outputs(outputs, app.watershed(params) if app is not None else params)


def batch_size(shape: list[int] | None, max_batch: int, min_model_size: int) -> int:
    """Items per Predict request, as kiosk-redis-consumer's ``GrpcModelWrapper.get_batch_size``
    (grpc_clients.py): TF_MAX_BATCH_SIZE divided by the model input's size relative to a
    TF_MIN_MODEL_SIZE square (fixed spatial dimensions only) times its channels; at least 1."""
    ratio = 1.0
    if shape:
        for size in shape[1:-1]:
            if size > 0:
                ratio *= size / min_model_size
        ratio *= shape[-1] if shape[-1] > 0 else 1
    return max(1, int(max_batch // abs(ratio)))


def object_count(labels: np.ndarray) -> int:
    """Objects in (N, H, W, K) labels: distinct non-zero labels per frame and label channel."""
    if labels.ndim == 2:
        labels = labels[np.newaxis, ..., np.newaxis]
    elif labels.ndim == 3:
        labels = labels[..., np.newaxis]
    return sum(int(np.count_nonzero(np.unique(labels[n, ..., k])))
               for n in range(labels.shape[0]) for k in range(labels.shape[-1]))
