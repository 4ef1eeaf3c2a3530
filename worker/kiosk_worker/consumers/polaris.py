"""The polaris consumer (CONSUMER_TYPE ``polaris``): singleplex FISH analysis, partly.

Upstream's ``PolarisConsumer`` takes a multichannel image whose ``channels`` entries are
(spots, nuclear, cytoplasm), queues the spot channel on ``spot`` and, by the job's
``segmentation_type``, the nuclear / cytoplasm channels on ``segmentation`` ('cell culture') or
both on ``mesmer`` ('tissue'), waits for those jobs and assigns every spot to the label under it.

This worker does the ``segmentation_type`` 'none' case, spot detection only, in the job itself
(the spot consumer's steps on the first ``channels`` entry) and writes upstream's result for
it: one zip with ``{stem}_{i}.csv`` per frame, header ``x,y`` and one row per spot (x = column,
y = row). 'cell culture' and 'tissue' (segmentation and spot-to-cell assignment) are not done
yet: such jobs fail with a one-line reason (``REASON``), never silently.
"""

from __future__ import annotations

import csv
import io
import zipfile

import numpy as np

import kiosk_protocol as protocol
from kiosk_worker.consumers.spot import SpotConsumer
from kiosk_worker.errors import JobError

__all__ = ["REASON", "PolarisConsumer"]

REASON = ("polaris segmentation_type '{kind}' (segmentation + spot-to-cell assignment) is not "
          "supported by this worker yet; segmentation_type 'none' (spots only) is")


class PolarisConsumer(SpotConsumer):
    """Spots of the first ``channels`` entry as CSV (segmentation_type 'none'); see module doc."""

    def _consume(self, redis_hash: str) -> str:
        kind = (self.job.get("segmentation_type") or "").strip()
        if kind != "none":
            raise JobError(REASON.format(kind=kind))
        entries = (self.job.get("channels") or "").split(",")
        spot_channel = entries[0].strip() if entries and entries[0].strip() else "0"
        _, coords, stem = self.detect_spots(redis_hash, spot_channel)
        self.set_status(redis_hash, protocol.SAVING_RESULTS)
        return self.upload_zip(self.csv_zip(coords, stem), stem)

    @staticmethod
    def csv_zip(coords: list[np.ndarray], stem: str) -> bytes:
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
            for i, points in enumerate(coords):
                text = io.StringIO()
                writer = csv.writer(text, delimiter=",", lineterminator="\r\n")
                writer.writerow(["x", "y"])
                for y, x in points:
                    writer.writerow([x, y])
                zf.writestr(f"{stem}_{i}.csv", text.getvalue())
        return buf.getvalue()
