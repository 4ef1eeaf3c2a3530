"""The spot-detection consumer (CONSUMER_TYPE ``spot``), as kiosk-redis-consumer's ``SpotConsumer``.

The model is POLARIS_MODEL (default ``SpotDetection:3``). Each frame is one single-channel
image (the job's ``channels`` picks the channel of a multichannel image); it is min-max
normalised (POLARIS_CLIP: first clipped to its 0.01-99.9 percentiles), as deepcell-spots'
``min_max_normalize``, and sent to the model; spots are the local maxima (min_distance 1) of
the ``classification`` output's channel 1 above POLARIS_THRESHOLD, moved by the
``offset_regression`` output at that pixel (deepcell-spots' ``y_annotations_to_point_list_max``).
POLARIS_SCALE is not used here (upstream's polaris consumer writes it into the spot jobs it
queues; the spot model is not rescaled).

Results as upstream names them: one zip with, per frame i, ``{stem}_{i}.npy`` (float64
(n, 2) spot centres as [y, x]) and ``{stem}_{i}.tif``. Upstream's TIFF is a matplotlib figure of
the frame with the spots drawn on it; this worker writes the frame (uint8) with each spot's
pixel set to 255 instead.
"""

from __future__ import annotations

import io
import zipfile

import numpy as np

import kiosk_protocol as protocol
from kiosk_worker import imaging, model_choice, results
from kiosk_worker.consumers.segmentation import SegmentationConsumer
from kiosk_worker.errors import JobError, ModelMismatch

__all__ = ["SpotConsumer", "min_max_normalize", "spot_coordinates"]

def min_max_normalize(image: np.ndarray, clip: bool = False) -> np.ndarray:
    """deepcell-spots ``min_max_normalize``: each (H, W) frame of (N, H, W, C) to [0, 1]."""
    out = np.empty(image.shape, dtype=np.float32)
    for i in range(image.shape[0]):
        for c in range(image.shape[-1]):
            frame = image[i, ..., c].astype(np.float64)
            if clip:
                frame = np.clip(frame, *np.percentile(frame, [0.01, 99.9]))
            low, high = frame.min(), frame.max()
            out[i, ..., c] = (frame - low) / (high - low) if high > low else 0.0
    return out

def spot_coordinates(classification: np.ndarray, offset: np.ndarray, threshold: float,
                     min_distance: int = 1) -> list[np.ndarray]:
    """deepcell-spots ``y_annotations_to_point_list_max``: per frame, (n, 2) [y, x] centres."""
    from skimage.feature import peak_local_max

    if classification.ndim != 4 or offset.ndim != 4 or offset.shape[-1] != 2 \
            or classification.shape[-1] < 2:
        raise ModelMismatch(f"spot model outputs have shapes {list(classification.shape)} and "
                            f"{list(offset.shape)}; expected [batch, height, width, 2] each")
    coords = []
    for i in range(classification.shape[0]):
        peaks = peak_local_max(classification[i, ..., 1], min_distance=min_distance,
                               threshold_abs=threshold)
        shift = offset[i][tuple(peaks.T)] if len(peaks) else np.zeros((0, 2))
        coords.append((peaks + shift).astype(np.float64).reshape(-1, 2))
    return coords

class SpotConsumer(SegmentationConsumer):
    """Single-channel images through a spot-detection model; a zip of coordinates per job."""

    def _consume(self, redis_hash: str) -> str:
        image, coords, stem = self.detect_spots(redis_hash, self.job.get("channels", ""))
        self.set_status(redis_hash, protocol.SAVING_RESULTS)
        return self.upload_zip(self.zip_results(image, coords, stem), stem)

    def load_input(self, redis_hash: str) -> np.ndarray:
        """Download and decode the job's input as (N, H, W, C); status pre-processing."""
        input_name = self.job.get("input_file_name", "")
        if not input_name:
            raise JobError("the job names no input file (input_file_name is empty)")
        self.set_status(redis_hash, protocol.PRE_PROCESSING)
        with self.timed("download_time"):
            local = self.storage.readable_path(input_name, self.tempdir)
        return self.load(local, self.job)

    def detect_spots(self, redis_hash: str, channels: str, raw: np.ndarray | None = None
                     ) -> tuple[np.ndarray, list[np.ndarray], str]:
        """Download (unless ``raw`` is the loaded input), normalise, predict and post-process:
        ((N, H, W, 1) normalised image, per-frame (n, 2) [y, x] spot centres, result stem).
        Statuses pre-processing to post-processing."""
        from kiosk_worker.tfs.client import ModelNotFound

        job = self.job
        model = model_choice.ModelRef.parse(self.settings.polaris_model, "POLARIS_MODEL")
        if raw is None:  # a spot job of its own (polaris's spots write no dim_order, as upstream)
            raw = self.load_input(redis_hash)
            # The Kiosk's spot consumer sends (batch, H, W, 1) frames: its detected order.
            self.update_key(redis_hash, {"dim_order": imaging.detected_dim_order((*raw.shape[1:3], 1))})
        input_name = job.get("input_file_name", "")
        try:
            inputs = self.get_model_metadata(model.name, model.version)
        except ModelNotFound as err:
            raise JobError(f"{err} ({model.source} names the spot model)") from None
        image, tile = self.fit_model(raw, inputs, channels, model.name)
        image = min_max_normalize(image, self.settings.polaris_clip)

        self.set_status(redis_hash, protocol.PREDICTING)
        outputs = self.predict(image, model.name, model.version, tile)

        self.set_status(redis_hash, protocol.POST_PROCESSING)
        if "classification" not in outputs or "offset_regression" not in outputs:
            raise ModelMismatch(f"model '{model.name}' has outputs {sorted(outputs)}; a spot model "
                                "has 'classification' and 'offset_regression'")
        coords = spot_coordinates(outputs["classification"], outputs["offset_regression"],
                                  self.settings.polaris_threshold)
        return image, coords, results.result_stem(job.get("original_name") or input_name)

    def upload_zip(self, data: bytes, stem: str) -> str:
        with self.timed("upload_time"):
            dest, url = self.storage.upload_data(data, f"{stem}.zip")
        self.finish_fields.update(output_url=url, output_file_name=dest, total_jobs=1)
        return self.final_status

    @staticmethod
    def zip_results(image: np.ndarray, coords: list[np.ndarray], stem: str) -> bytes:
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
            for i, points in enumerate(coords):
                frame = (np.clip(image[i, ..., 0], 0, 1) * 200).astype(np.uint8)
                pix = np.round(points).astype(int).reshape(-1, 2)
                inside = ((pix >= 0) & (pix < frame.shape)).all(axis=1)
                frame[tuple(pix[inside].T)] = 255
                npy = io.BytesIO()
                np.save(npy, points)
                zf.writestr(f"{stem}_{i}.tif", results.tiff_bytes(frame))
                zf.writestr(f"{stem}_{i}.npy", npy.getvalue())
        return buf.getvalue()
