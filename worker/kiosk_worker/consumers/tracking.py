"""The tracking consumer (CONSUMER_TYPE ``tracking``, alias ``caliban``).

A time-lapse stack (T, H, W[, C]) is segmented frame by frame with the same
steps as the segmentation consumer (model signature check, tiling, Predict in
batches, deep watershed), then tracked as the Kiosk's caliban consumer tracks
(``kiosk_worker.tracking_caliban``): per-cell features through the
NEIGHBORHOOD_ENCODER model, frame-to-frame link scores from the TRACKING_MODEL
(CALIBAN_MODEL) inference model, both over gRPC, and upstream's assignment with
births, deaths and divisions (MAX_DISTANCE, APPEARANCE_DIM, BIRTH, DEATH, DIVISION,
TRACK_LENGTH, CROP_MODE, CALIBAN_NORM). Upstream has no tracker without the models and
this consumer follows it: a configured tracking model that is not served fails the job with a
one-line reason. With NEIGHBORHOOD_ENCODER set empty (no tracking models configured) it links
cells by overlap instead (``kiosk_worker.tracking``, TRACK_MAX_GAP). The result zip holds
``{stem}_feature_0.tif`` (the T x H x W label stack, one id per cell over time, float32 under
upstream's name, as its ``save_numpy_array`` writes ``y_tracked``) and
``lineage.json`` (id -> label, frames, daughters, capped, frame_div, parent; capped = divided).

The segmentation model is chosen as for segmentation jobs (``model_choice``): the job's
``model_name``, else NUCLEAR_MODEL on channel 0 (the Kiosk's tracking consumer segments
its frames with ``channels='0,,'``), or the one model its ``channels`` position names.
Movies with more than MAX_IMAGE_FRAMES frames fail, as in the Kiosk.
"""

from __future__ import annotations

import json
import os

import numpy as np

import kiosk_protocol as protocol
from kiosk_worker import imaging, model_choice, results, tracking, tracking_caliban
from kiosk_worker.consumers.segmentation import SegmentationConsumer
from kiosk_worker.errors import BadImage, JobError, ModelMismatch
from kiosk_worker.model_choice import ModelRef, Step

__all__ = ["EMBEDDING_AXIS", "TrackingConsumer", "movie_order"]

#: The encoder's output the Kiosk reads: the second by name (its consumer passes
#: embedding_axis=1 to deepcell's CellTracking over its gRPC model wrapper).
EMBEDDING_AXIS = 1
ENCODER_INPUTS = ("encoder_app_input", "encoder_morph_input", "encoder_centroid_input", "encoder_adj_input")
INFERENCE_INPUTS = ("current_embeddings", "current_centroids", "future_embeddings", "future_centroids")


def movie_order(ndim: int, shape: tuple[int, ...], dimension_order: str = "") -> str:
    """Axis order of a movie: the job's ``dimension_order``, else TYX / TYXC / TCYX."""
    if dimension_order.strip():
        return dimension_order.strip().upper()
    if ndim == 2:
        return "YX"
    if ndim == 3:
        return "TYX"
    if ndim == 4:
        return "TYXC" if shape[-1] <= 4 else "TCYX"
    raise BadImage(f"time-lapse has {ndim} dimensions; expected frames x height x width [x channels]")


class TrackingConsumer(SegmentationConsumer):
    """Segment every frame through the model, then track; one zip with labels + lineage."""

    #: the job's movie as loaded (T, H, W, C) and the channel its frames were segmented from
    _movie: np.ndarray | None = None
    _channel: int = 0

    @property
    def params(self) -> tracking_caliban.CalibanParams:
        """The tracker's settings and the job caps, from the worker's settings."""
        return tracking_caliban.CalibanParams.from_settings(self.settings)

    def _consume(self, redis_hash: str) -> str:
        self._movie = None
        self._channel = 0
        labels, stem = self.segment(redis_hash)  # every frame through the model
        if self._movie is None:
            raise JobError("the movie was not loaded")
        self.set_status(redis_hash, protocol.PREDICTING)  # upstream's status while its tracker runs
        result = self.track(self._movie[..., self._channel], labels)

        self.set_status(redis_hash, protocol.SAVING_RESULTS)
        paths = self.save(result, stem)
        zip_path = results.zip_files(paths, os.path.join(self.tempdir, f"{stem}.zip"))
        with self.timed("upload_time"):
            dest, url = self.storage.upload(zip_path)
        self.finish_fields.update(output_url=url, output_file_name=dest, total_jobs=1)
        self.logger.info("tracked %s: %d frames, %d cells, %d divisions", redis_hash,
                         labels.shape[0], len(result.lineage), len(result.divisions))
        return self.final_status

    def load(self, local_path: str, job: dict[str, str]) -> np.ndarray:
        """The movie as (T, H, W, C), size-checked from its header first."""
        order = job.get("dimension_order", "")
        info = imaging.read_header(local_path)
        order = movie_order(len(info.shape), info.shape, order)
        frames = imaging.frame_count(info.shape, order)
        if frames > self.settings.max_image_frames:
            raise BadImage(f"the time-lapse has {frames} frames, over the limit of "
                           f"{self.settings.max_image_frames} (MAX_IMAGE_FRAMES)")
        raw = imaging.load_image(local_path, self.settings.max_image_height,
                                 self.settings.max_image_width, order,
                                 max_decoded_bytes=self.settings.max_decoded_bytes)
        self._movie = imaging.to_nhwc(raw, order)
        return self._movie

    def plan(self, job: dict[str, str], image: np.ndarray) -> list[Step]:
        """One segmentation model (the tracker follows one label image per frame)."""
        steps = super().plan(job, image)
        if len(steps) > 1:
            raise JobError(f"channels '{job.get('channels', '')}' names {len(steps)} channels to "
                           "segment; tracking follows one: name one channel")
        self._channel = (steps[0].channel or 0) if steps else 0
        return steps

    def track(self, movie: np.ndarray, labels: np.ndarray) -> tracking.TrackingResult:
        """Track (T, H, W) labels of a (T, H, W) movie through the two tracking models, or by
        overlap when NEIGHBORHOOD_ENCODER is set empty (no tracking models configured)."""
        if not self.settings.neighborhood_encoder:
            overlap = tracking.TrackingParams(max_gap=self.settings.track_max_gap,
                                              max_frames=self.settings.max_image_frames,
                                              max_cells=self.settings.max_cells_per_frame)
            try:
                return tracking.track(labels, overlap)
            except tracking.TrackingTooLarge as err:
                raise JobError(str(err)) from None
        encoder_ref = ModelRef.parse(self.settings.neighborhood_encoder, "NEIGHBORHOOD_ENCODER")
        inference_ref = model_choice.tracking_model(self.settings)
        encoder_sig = self.model_inputs(encoder_ref, ENCODER_INPUTS)
        inference_sig = self.model_inputs(inference_ref, INFERENCE_INPUTS)

        def encoder(inputs: dict[str, np.ndarray]) -> np.ndarray:
            out = self.call_model(encoder_ref, encoder_sig, inputs)
            if len(out) <= EMBEDDING_AXIS:
                raise ModelMismatch(f"model '{encoder_ref}' returned outputs {sorted(out)}; the "
                                    "neighborhood encoder returns embeddings and centroids")
            return out[sorted(out)[EMBEDDING_AXIS]]

        def inference(inputs: dict[str, np.ndarray]) -> np.ndarray:
            out = self.call_model(inference_ref, inference_sig, inputs)
            return out[sorted(out)[0]]

        try:
            return tracking_caliban.track_with_models(movie, labels, encoder, inference, self.params)
        except tracking.TrackingTooLarge as err:
            raise JobError(str(err)) from None

    def model_inputs(self, ref: ModelRef, names: tuple[str, ...]) -> dict[str, dict]:
        """The model's input signature, checked to hold the tensors the tracker sends."""
        from kiosk_worker.tfs.client import ModelNotFound

        try:
            inputs = self.get_model_metadata(ref.name, ref.version)
        except ModelNotFound as err:
            raise JobError(f"{err} (tracking needs it: {ref.source})") from None
        missing = sorted(set(names) - set(inputs))
        if missing:
            raise ModelMismatch(f"model '{ref}' ({ref.source}) has inputs {sorted(inputs)}; the "
                                f"tracker sends {list(names)}")
        return inputs

    def call_model(self, ref: ModelRef, signature: dict[str, dict], inputs: dict[str, np.ndarray]
                   ) -> dict[str, np.ndarray]:
        """One Predict with several named inputs, each cast to its signature dtype."""
        from kiosk_worker.tfs.tensor import dtype_from_name, from_tf_dtype

        cast = {k: np.ascontiguousarray(v, dtype=np.dtype(from_tf_dtype(dtype_from_name(signature[k]["dtype"]))))
                for k, v in inputs.items()}
        return self.tf_client.predict(ref.name, self.parse_model_version(ref.version), cast)

    def save(self, result: tracking.TrackingResult, stem: str) -> list[str]:
        import tifffile

        stack_path = os.path.join(self.tempdir, f"{stem}_feature_0.tif")
        # float32 holds every id exactly (ids stay far below 2**24 under the frame and cell caps)
        tifffile.imwrite(stack_path, np.ascontiguousarray(result.labels, dtype=np.float32),
                         compression="zlib", photometric="minisblack", metadata={"axes": "TYX"})
        lineage_path = os.path.join(self.tempdir, "lineage.json")
        with open(lineage_path, "w", encoding="utf-8") as fh:
            json.dump(tracking.lineage_json(result.lineage), fh, indent=1)
        return [stack_path, lineage_path]
