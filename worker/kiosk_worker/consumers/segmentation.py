"""The segmentation consumer (CONSUMER_TYPE ``segmentation``, alias ``image``).

download -> header check and decode -> (N, H, W, C) with the job's
dimension_order / channels -> validate against the model signature -> tile if
the model has a fixed input size -> Predict in batches -> deep watershed ->
label TIFFs -> zip -> upload -> done.

Status order: started, pre-processing, predicting, post-processing,
saving-results, done (the Kiosk's, with post-processing in between).
"""

from __future__ import annotations

from typing import Any

import numpy as np

import kiosk_protocol as protocol
from kiosk_worker import imaging, results, tiling
from kiosk_worker.consumers.base import TensorFlowServingConsumer
from kiosk_worker.errors import JobError, ModelMismatch
from kiosk_worker.postprocess import WatershedParams, label_batch

__all__ = ["SegmentationConsumer"]

INNER = "inner_distance"
FOREGROUND = "foreground"


class SegmentationConsumer(TensorFlowServingConsumer):
    """Single images through a deep-watershed model; one zip of label TIFFs per job."""

    watershed = WatershedParams()
    tile_overlap = 0.25

    def _consume(self, redis_hash: str) -> str:
        labels, stem = self.segment(redis_hash)
        self.set_status(redis_hash, protocol.SAVING_RESULTS)
        data = results.zip_arrays_bytes(results.label_members(labels, stem))
        with self.timed("upload_time"):
            dest, url = self.storage.upload_data(data, f"{stem}.zip")
        self.finish_fields.update(output_url=url, output_file_name=dest, total_jobs=1)
        return self.final_status

    def segment(self, redis_hash: str) -> tuple[np.ndarray, str]:
        """Download, load, predict and post-process the job's input: (labels, result stem).

        Shared by every consumer that segments before doing its own saving (e.g. tracking);
        statuses run from pre-processing to post-processing.
        """
        job = self.job
        model_name, model_version = job.get("model_name", ""), job.get("model_version", "")
        input_name = job.get("input_file_name", "")
        if not input_name:
            raise JobError("the job names no input file (input_file_name is empty)")

        self.set_status(redis_hash, protocol.PRE_PROCESSING)
        with self.timed("download_time"):
            local = self.storage.readable_path(input_name, self.tempdir)  # read only
        image = self.load(local, job)
        inputs = self.get_model_metadata(model_name, model_version)
        image, tile = self.fit_model(image, inputs, job.get("channels", ""), model_name)

        self.set_status(redis_hash, protocol.PREDICTING)
        outputs = self.predict(image, model_name, model_version, tile)

        self.set_status(redis_hash, protocol.POST_PROCESSING)
        labels = self.postprocess(outputs)
        return labels, results.result_stem(job.get("original_name") or input_name)

    # -- steps (overridable) -------------------------------------------------
    def load(self, local_path: str, job: dict[str, str]) -> np.ndarray:
        """Decoded image as (N, H, W, C), size-checked from its header first."""
        order = job.get("dimension_order", "")
        raw = imaging.load_image(local_path, self.settings.max_image_height,
                                 self.settings.max_image_width, order)
        return imaging.to_nhwc(raw, order)

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
        image = imaging.fit_channels(image, channels, model_channels)
        tile = (shape[1], shape[2]) if shape is not None and shape[1] > 0 and shape[2] > 0 else None
        return image.astype(np.float32, copy=False), tile

    def predict(self, image: np.ndarray, model_name: str, model_version: str,
                tile: tuple[int, int] | None) -> dict[str, np.ndarray]:
        """Model outputs for the whole batch, tiled and stitched when the model input is fixed."""
        _, h, w, _ = image.shape
        if tile is None or not tiling.needs_tiling(h, w, *tile):
            return self.grpc_image(image, model_name, model_version)
        tiles, plan = tiling.tile_image(image, tile[0], tile[1], self.tile_overlap)
        outputs = self.grpc_image(tiles, model_name, model_version)
        return {name: tiling.stitch(out, plan) for name, out in outputs.items()
                if out.ndim >= 3 and out.shape[0] == plan.count}

    def postprocess(self, outputs: dict[str, np.ndarray]) -> np.ndarray:
        if INNER not in outputs or FOREGROUND not in outputs:
            raise ModelMismatch(f"model outputs {sorted(outputs)}; the segmentation consumer needs "
                                f"'{INNER}' and '{FOREGROUND}'")
        return label_batch(outputs[INNER], outputs[FOREGROUND], self.watershed)
