"""The tracking consumer (CONSUMER_TYPE ``tracking``, alias ``caliban``).

A time-lapse stack (T, H, W[, C]) is segmented frame by frame with the same
steps as the segmentation consumer (model signature check, tiling, Predict in
batches, deep watershed), then ``kiosk_worker.tracking`` links the cells
across frames. The result zip holds ``{stem}_tracked.tif`` (the T x H x W
label stack, one id per cell over time) and ``lineage.json``
(id -> frames, parent, daughters, frame_div, capped).

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
from kiosk_worker import imaging, results, tracking
from kiosk_worker.consumers.segmentation import SegmentationConsumer
from kiosk_worker.errors import BadImage, JobError
from kiosk_worker.model_choice import Step

__all__ = ["TrackingConsumer", "movie_order"]


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

    @property
    def params(self) -> tracking.TrackingParams:
        return tracking.TrackingParams(max_gap=self.settings.track_max_gap, max_frames=self.settings.max_image_frames,
                                       max_cells=self.settings.max_cells_per_frame)

    def _consume(self, redis_hash: str) -> str:
        labels, stem = self.segment(redis_hash)  # every frame through the model
        result = tracking.track(labels, self.params)

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
        return imaging.to_nhwc(raw, order)

    def plan(self, job: dict[str, str], image: np.ndarray) -> list[Step]:
        """One segmentation model (the tracker follows one label image per frame)."""
        steps = super().plan(job, image)
        if len(steps) > 1:
            raise JobError(f"channels '{job.get('channels', '')}' names {len(steps)} channels to "
                           "segment; tracking follows one: name one channel")
        return steps

    def save(self, result: tracking.TrackingResult, stem: str) -> list[str]:
        import tifffile

        stack_path = os.path.join(self.tempdir, f"{stem}_tracked.tif")
        tifffile.imwrite(stack_path, np.ascontiguousarray(result.labels, dtype=np.int32),
                         compression="zlib", photometric="minisblack", metadata={"axes": "TYX"})
        lineage_path = os.path.join(self.tempdir, "lineage.json")
        with open(lineage_path, "w", encoding="utf-8") as fh:
            json.dump(tracking.lineage_json(result.lineage), fh, indent=1)
        return [stack_path, lineage_path]
