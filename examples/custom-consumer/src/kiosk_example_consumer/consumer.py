"""``thresholder``: label the bright objects of an image, without any model.

The smallest useful consumer: it follows the Kiosk contract (subclass the
base consumer, implement ``_consume(redis_hash)``, return the final status)
and leaves everything else (status bookkeeping, temp dirs, failures, retries,
expiry, heartbeats) to kiosk-worker.
"""

from __future__ import annotations

import os

import numpy as np
from scipy import ndimage

import kiosk_protocol as protocol
from kiosk_worker import imaging, results
from kiosk_worker.consumers.base import Consumer
from kiosk_worker.errors import JobError

__all__ = ["ThresholdConsumer", "threshold_labels"]


def threshold_labels(image: np.ndarray, level: float | None = None) -> np.ndarray:
    """(H, W) image -> int32 labels of the connected regions above ``level``.

    ``level`` None picks it with Otsu's method (scikit-image).
    """
    image = np.asarray(image, dtype=np.float64)
    if level is None:
        from skimage.filters import threshold_otsu

        level = float(threshold_otsu(image)) if np.ptp(image) > 0 else float(image.max()) + 1
    labels, _ = ndimage.label(image > level)
    return labels.astype(np.int32)


class ThresholdConsumer(Consumer):
    """CONSUMER_TYPE=thresholder. Optional env THRESHOLD fixes the level (default: Otsu)."""

    def _consume(self, redis_hash: str) -> str:
        # 1. Read the job hash (str -> str, the fields the Kiosk frontend wrote).
        hvals = self.redis.hgetall(redis_hash)
        input_name = hvals.get("input_file_name", "")
        if not input_name:
            raise JobError("the job names no input file")  # -> status failed, this reason

        # 2. Download into the per-job temp dir (removed for you afterwards).
        self.update_key(redis_hash, {"status": protocol.PRE_PROCESSING})
        with self.timed("download_time"):
            local = self.storage.download(input_name, self.tempdir)

        # 3. Load with the worker's safe loader (size limits, one-line errors), as (N, H, W, C).
        image = imaging.load_image(local, self.settings.max_image_height, self.settings.max_image_width,
                                   hvals.get("dimension_order", ""))
        frames = imaging.to_nhwc(image, hvals.get("dimension_order", ""))

        # 4. The actual work: no model, just a threshold per frame on channel 0.
        self.update_key(redis_hash, {"status": protocol.POST_PROCESSING})
        level = float(os.environ["THRESHOLD"]) if os.environ.get("THRESHOLD") else None
        labels = np.stack([threshold_labels(frame[..., 0], level) for frame in frames])

        # 5. Save, zip, upload; record where the result is.
        self.update_key(redis_hash, {"status": protocol.SAVING_RESULTS})
        stem = results.result_stem(hvals.get("original_name") or input_name)
        paths = results.save_labels(labels, self.tempdir, stem)
        zip_path = results.zip_files(paths, os.path.join(self.tempdir, f"{stem}.zip"))
        with self.timed("upload_time"):
            dest, url = self.storage.upload(zip_path)
        self.finish_fields.update(output_url=url, output_file_name=dest)

        # 6. Return the final status: the base class writes it with finish_fields and
        #    removes the job from the processing list in one transaction.
        return self.final_status
