"""The Mesmer consumer (CONSUMER_TYPE ``mesmer``): whole-cell and nuclear segmentation of
two-channel (nuclear, membrane) images, as kiosk-redis-consumer's ``MesmerConsumer``.

The model is MESMER_MODEL (default MULTIPLEX_MODEL, ``MultiplexSegmentation:9``) whatever the
job's ``model_name`` says, as upstream. The job's ``channels`` picks the nuclear and membrane
channels ('0,1'; '' takes the image's channels as they are, which must then be two). The
compartment is the job's ``compartment`` field, else MESMER_COMPARTMENT: ``whole-cell``,
``nuclear`` or ``both`` (two label images per frame, whole-cell first, as deepcell's
``mesmer_postprocess`` concatenates them). The model's four outputs are read in name order as
deepcell's ``format_output_mesmer`` reads them (whole-cell inner distance and pixelwise, nuclear
inner distance and pixelwise; interior = pixelwise channel 1) and labelled by deep watershed with
Mesmer's own per-compartment defaults. Before the model call the image is resized by the job's
``scale`` and pre-processed as deepcell's ``mesmer_preprocess`` (``pipeline``: percentile
clipping, histogram normalization).
Results are upstream's: one zip of label TIFFs named ``{stem}_batch_{i}_feature_{k}.tif``.
"""

from __future__ import annotations

import numpy as np

import kiosk_protocol as protocol
from kiosk_worker import imaging, model_choice, results
from kiosk_worker.consumers.segmentation import SegmentationConsumer
from kiosk_worker.errors import JobError, ModelMismatch
from kiosk_worker.pipeline import mesmer_preprocess
from kiosk_worker.postprocess import WatershedParams, check_postprocess_function, label_batch

__all__ = ["COMPARTMENTS", "MesmerConsumer"]

COMPARTMENTS = ("whole-cell", "nuclear", "both")

#: deepcell-tf Mesmer.predict's default postprocess kwargs per compartment.
WHOLE_CELL = WatershedParams(maxima_threshold=0.075, maxima_smooth=0, interior_threshold=0.2,
                             interior_smooth=2, small_objects_threshold=15, fill_holes_threshold=15,
                             radius=2)
NUCLEAR = WatershedParams(maxima_threshold=0.1, maxima_smooth=0, interior_threshold=0.2,
                          interior_smooth=2, small_objects_threshold=15, fill_holes_threshold=15,
                          radius=2)


class MesmerConsumer(SegmentationConsumer):
    """Two-channel images through Mesmer; one zip of label TIFFs per job."""

    def compartment(self) -> str:
        value = (self.job.get("compartment") or self.settings.mesmer_compartment or "").strip()
        if value not in COMPARTMENTS:
            raise JobError(f"compartment '{value}' is not one of {', '.join(COMPARTMENTS)}")
        return value

    def segment_channels(self, redis_hash: str) -> tuple[np.ndarray, str]:
        """(N, H, W, K) labels (K = 2 for ``both``) and the result stem."""
        job = self.job
        input_name = job.get("input_file_name", "")
        if not input_name:
            raise JobError("the job names no input file (input_file_name is empty)")
        compartment = self.compartment()
        check_postprocess_function(job.get("postprocess_function"))

        self.set_status(redis_hash, protocol.PRE_PROCESSING)
        with self.timed("download_time"):
            local = self.storage.readable_path(input_name, self.tempdir)
        image = self.load(local, job)
        # As the Kiosk's mesmer consumer: the detected order of the squeezed file array.
        squeezed = [d for d in imaging.read_header(local).shape if d != 1]
        self.update_key(redis_hash, {"dim_order": imaging.detected_dim_order(squeezed)})
        scale = model_choice.image_scale(job.get("scale"), self.settings)
        given = (job.get("scale") or "").strip()
        labels = self.mesmer_labels(redis_hash, image, job.get("channels", ""), scale, compartment,
                                    {} if given else {"scale": f"{scale:g}"})
        return labels, results.result_stem(job.get("original_name") or input_name)

    def mesmer_labels(self, redis_hash: str, image: np.ndarray, channels: str, scale: float,
                      compartment: str, predicting_fields: dict[str, str] | None = None) -> np.ndarray:
        """(N, H, W, K) labels of a loaded (N, H, W, C) image (K = 2 for ``both``), through
        Mesmer's pre-processing, the model and its per-compartment watershed; statuses
        predicting and post-processing (shared with the polaris consumer's 'tissue' type)."""
        from kiosk_worker.tfs.client import ModelNotFound

        model = model_choice.mesmer_model(self.settings)
        _, height, width, _ = image.shape
        try:
            inputs = self.get_model_metadata(model.name, model.version)
        except ModelNotFound as err:
            raise JobError(f"{err} ({model.source} names the Mesmer model)") from None
        image, tile = self.fit_model(image, inputs, channels, model.name)
        image = imaging.rescale(image, scale, self.settings.max_image_height,
                                self.settings.max_image_width)
        image = mesmer_preprocess(image)

        self.set_status(redis_hash, protocol.PREDICTING, **(predicting_fields or {}))
        outputs = self.predict(image, model.name, model.version, tile)

        self.set_status(redis_hash, protocol.POST_PROCESSING)
        heads = self.heads(outputs, model.name)
        wanted = ["whole-cell", "nuclear"] if compartment == "both" else [compartment]
        labels = []
        for name in wanted:
            inner, pixelwise = heads[name]
            params = WHOLE_CELL if name == "whole-cell" else NUCLEAR
            labels.append(imaging.resize_labels(label_batch(inner, pixelwise[..., 1:2], params),
                                                height, width))
        return np.stack(labels, axis=-1)

    @staticmethod
    def heads(outputs: dict[str, np.ndarray], model_name: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """deepcell's format_output_mesmer: four outputs in name order -> per compartment
        (inner distance, pixelwise)."""
        names = sorted(outputs)
        if len(names) != 4:
            raise ModelMismatch(f"model '{model_name}' has outputs {names}; Mesmer has four "
                                "(whole-cell and nuclear inner distance and pixelwise)")
        arrays = [outputs[n] for n in names]
        for n, arr in zip(names[1::2], arrays[1::2], strict=True):
            if arr.ndim != 4 or arr.shape[-1] < 2:
                raise ModelMismatch(f"model '{model_name}' output '{n}' has shape {list(arr.shape)}; "
                                    "Mesmer's pixelwise heads are [batch, height, width, 3]")
        return {"whole-cell": (arrays[0], arrays[1]), "nuclear": (arrays[2], arrays[3])}
