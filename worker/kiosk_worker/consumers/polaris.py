"""The polaris consumer (CONSUMER_TYPE ``polaris``): singleplex FISH analysis, as
kiosk-redis-consumer's ``PolarisConsumer`` (consumers/polaris_consumer.py at a183af9).

The job's ``channels`` entries are (spots, nuclear, cytoplasm) image channels; the spots
channel defaults to 0. Upstream queues each part as a job of its own (``spot``, ``segmentation``
or ``mesmer``), waits for them and combines their results; this worker runs the same steps
in the job itself, with the same models and settings those consumers use, so no other queue
needs a worker:

* spots: the spot consumer's steps (POLARIS_MODEL, POLARIS_CLIP, POLARIS_THRESHOLD) on the
  spots channel;
* ``segmentation_type`` 'cell culture': the nuclear channel (if named) through NUCLEAR_MODEL
  and the cytoplasm channel (if named) through CYTOPLASM_MODEL, each with its application
  pipeline at ``scale`` POLARIS_SCALE (upstream writes that scale into the child jobs); label
  channels nuclear first, then cytoplasm;
* 'tissue': nuclear and cytoplasm channels together through MESMER_MODEL at POLARIS_SCALE,
  compartment MESMER_COMPARTMENT (the child job upstream queues names none);
* 'none': spots only.

Results as upstream writes them, one zip: for 'none', ``{stem}_{i}.csv`` per frame i with
header ``x,y``; otherwise also ``{stem}_batch_{i}_feature_{k}.tif`` (the label images) and
the CSV has header ``x,y,cellID0`` (``,cellID1`` with two label channels): each spot with the
label under it in each label channel (0 = no cell). x is the column, y the row.
Any other ``segmentation_type``, or 'cell culture' without a nuclear or cytoplasm channel,
fails with a one-line reason (upstream fails such jobs too, with a traceback).
"""

from __future__ import annotations

import csv
import io
import zipfile

import numpy as np

import kiosk_protocol as protocol
from kiosk_worker import imaging, model_choice, pipeline, results
from kiosk_worker.consumers.mesmer import MesmerConsumer
from kiosk_worker.consumers.segmentation import object_count
from kiosk_worker.consumers.spot import SpotConsumer
from kiosk_worker.errors import JobError, ModelMismatch

__all__ = ["SEGMENTATION_TYPES", "PolarisConsumer"]

SEGMENTATION_TYPES = ("none", "cell culture", "tissue")


class PolarisConsumer(SpotConsumer, MesmerConsumer):
    """Spots of the first ``channels`` entry, cells of the others, spots assigned to cells."""

    def _consume(self, redis_hash: str) -> str:
        kind = (self.job.get("segmentation_type") or "").strip()
        if kind not in SEGMENTATION_TYPES:
            raise JobError(f"polaris segmentation_type '{kind}' is not one of "
                           f"{', '.join(repr(k) for k in SEGMENTATION_TYPES)}")
        entries = model_choice.parse_channels(self.job.get("channels"))
        entries += [None] * (3 - len(entries))
        spot_channel, nuclear, cytoplasm = entries[:3]
        if kind == "cell culture" and nuclear is None and cytoplasm is None:
            raise JobError("polaris 'cell culture' needs a nuclear or cytoplasm channel "
                           "(channels entries 2 and 3)")
        if kind == "tissue" and (nuclear is None or cytoplasm is None):
            raise JobError("polaris 'tissue' needs a nuclear and a cytoplasm channel "
                           "(channels entries 2 and 3)")
        raw = self.load_input(redis_hash)
        for index in (spot_channel, nuclear, cytoplasm):
            if index is not None and index >= raw.shape[-1]:
                raise ModelMismatch(f"channels '{self.job.get('channels', '')}' asks for channel "
                                    f"{index} but the image has {raw.shape[-1]}")
        _, coords, stem = self.detect_spots(redis_hash, str(spot_channel or 0), raw)
        if kind == "none":
            self.set_status(redis_hash, protocol.SAVING_RESULTS)
            return self.upload_zip(self.csv_zip(coords, stem), stem)

        scale = self.settings.polaris_scale
        if kind == "tissue":
            labels = self.mesmer_labels(redis_hash, raw, f"{nuclear},{cytoplasm}", scale,
                                        self.compartment_setting())
        else:
            parts = [self.label_channel(redis_hash, raw, index, model, scale)
                     for index, model in zip((nuclear, cytoplasm),
                                             model_choice.model_choices(self.settings)[:2],
                                             strict=True)
                     if index is not None]
            labels = np.stack(parts, axis=-1)
        self.set_status(redis_hash, protocol.SAVING_RESULTS)
        members: dict[str, np.ndarray | bytes] = dict(results.label_members(labels, stem))
        members.update(self.assignment_csvs(coords, labels, stem))
        self.finish_fields["object_count"] = str(object_count(labels))
        return self.upload_zip(zip_members(members), stem)

    def compartment_setting(self) -> str:
        """MESMER_COMPARTMENT: upstream's tissue child job carries no ``compartment`` field."""
        value = (self.settings.mesmer_compartment or "").strip()
        if value not in ("whole-cell", "nuclear", "both"):
            raise JobError(f"MESMER_COMPARTMENT '{value}' is not one of whole-cell, nuclear, both")
        return value

    def label_channel(self, redis_hash: str, raw: np.ndarray, index: int,
                      model: model_choice.ModelRef, scale: float) -> np.ndarray:
        """(N, H, W) labels of image channel ``index`` through ``model`` and its application
        (what upstream's segmentation consumer does with the child job)."""
        from kiosk_worker.tfs.client import ModelNotFound

        _, height, width, _ = raw.shape
        try:
            inputs = self.get_model_metadata(model.name, model.version)
        except ModelNotFound as err:
            raise JobError(f"{err} ({model.source} names the polaris segmentation model)") from None
        part = imaging.rescale(raw[..., index:index + 1], scale, self.settings.max_image_height,
                               self.settings.max_image_width)
        part, tile = self.fit_model(part, inputs, "", model.name)
        app = pipeline.application_for(model.name, self.settings)
        self.set_status(redis_hash, protocol.PREDICTING)
        outputs = self.predict(app.preprocess(part), model.name, model.version, tile)
        self.set_status(redis_hash, protocol.POST_PROCESSING)
        return imaging.resize_labels(self.postprocess(outputs, app), height, width)

    @staticmethod
    def assignment_csvs(coords: list[np.ndarray], labels: np.ndarray, stem: str) -> dict[str, bytes]:
        """``{stem}_{i}.csv`` per frame: x, y and the label under the spot in each label channel
        (upstream's header and truncation of the coordinates to a pixel)."""
        k = labels.shape[-1]
        header = ["x", "y", "cellID0"] + (["cellID1"] if k == 2 else [])
        out = {}
        for i, points in enumerate(coords):
            text = io.StringIO()
            writer = csv.writer(text, delimiter=",", lineterminator="\r\n")
            writer.writerow(header)
            for y, x in points:
                row = min(max(int(y), 0), labels.shape[1] - 1)
                col = min(max(int(x), 0), labels.shape[2] - 1)
                cells = [int(labels[i, row, col, c]) for c in range(min(k, 2))]
                writer.writerow([x, y, *cells])
            out[f"{stem}_{i}.csv"] = text.getvalue().encode()
        return out

    @staticmethod
    def csv_zip(coords: list[np.ndarray], stem: str) -> bytes:
        members: dict[str, np.ndarray | bytes] = {}
        for i, points in enumerate(coords):
            text = io.StringIO()
            writer = csv.writer(text, delimiter=",", lineterminator="\r\n")
            writer.writerow(["x", "y"])
            for y, x in points:
                writer.writerow([x, y])
            members[f"{stem}_{i}.csv"] = text.getvalue().encode()
        return zip_members(members)


def zip_members(members: dict[str, np.ndarray | bytes]) -> bytes:
    """A zip of CSV bytes and label arrays (as TIFFs), in the given order."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data if isinstance(data, bytes) else results.tiff_bytes(data))
    return buf.getvalue()
