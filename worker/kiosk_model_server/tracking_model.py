"""Stand-ins for the Kiosk's two tracking models (deepcell-tf's GNNTrackingModel, served as
``NuclearTrackingNE`` and ``NuclearTrackingInf``).

Signatures as the Keras models export them:

* neighborhood encoder: ``encoder_app_input`` [B, N, 32, 32, 1], ``encoder_morph_input``
  [B, N, 3] (area, perimeter, eccentricity), ``encoder_centroid_input`` [B, N, 2],
  ``encoder_adj_input`` [B, N, N] (normalised adjacency) -> ``relu_nef`` [B, N, 64] (the
  embeddings) and ``encoder_centroid_input`` [B, N, 2] (the centroids passed through); sorted by
  name the embeddings come second, which is why the Kiosk reads output 1.
* inference: ``current_embeddings`` [B, T, tracks, 64], ``current_centroids`` [B, T, tracks, 2],
  ``future_embeddings`` [B, 1, cells, 64], ``future_centroids`` [B, 1, cells, 2] ->
  ``tracking_decoder`` [B, 1, tracks, cells, 3], softmax over (same, different, daughter).

What they compute is what a trained model could: the encoder packs each cell's size, shape,
neighbour count and a coarse, standardised appearance into its embedding, after checking that
its inputs look like deepcell-tracking's features (plausible morphologies, a crop of the cell,
a D^-1/2 A D^-1/2 adjacency); otherwise it degrades to all-zero embeddings, so a worker that
skips the normalisation or sends the wrong features links nothing. The inference model scores
a (track, cell) pair as the same cell when the cell lies near the track's last centroid with a
similar area, and as a daughter when it lies within the track's cell and has about half its area.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from kiosk_model_server.models import Degraded, InputError, Model, TensorSpec

__all__ = ["EMBEDDING_DIM", "NeighborhoodEncoderModel", "TrackingInferenceModel", "encode"]

log = logging.getLogger(__name__)

EMBEDDING_DIM = 64
APPEARANCE_DIM = 32
#: embedding layout: sqrt(area), perimeter / sqrt(area), eccentricity, neighbours, 4x4 appearance
POOL = 4


@dataclass
class NeighborhoodEncoderModel(Model):
    """Cell features -> embeddings (see the module docstring)."""

    appearance_dim: int = APPEARANCE_DIM

    def __post_init__(self) -> None:
        a = self.appearance_dim
        self.inputs = {
            "encoder_app_input": TensorSpec("serving_default_encoder_app_input:0", "float32", (-1, -1, a, a, 1)),
            "encoder_morph_input": TensorSpec("serving_default_encoder_morph_input:0", "float32", (-1, -1, 3)),
            "encoder_centroid_input": TensorSpec("serving_default_encoder_centroid_input:0", "float32",
                                                 (-1, -1, 2)),
            "encoder_adj_input": TensorSpec("serving_default_encoder_adj_input:0", "float32", (-1, -1, -1)),
        }
        self.outputs = {
            "relu_nef": TensorSpec("StatefulPartitionedCall:1", "float32", (-1, -1, EMBEDDING_DIM)),
            "encoder_centroid_input": TensorSpec("StatefulPartitionedCall:0", "float32", (-1, -1, 2)),
        }

    def check(self, inputs: dict[str, np.ndarray]) -> None:
        super().check(inputs)
        b, n = inputs["encoder_morph_input"].shape[:2]
        for alias in ("encoder_app_input", "encoder_centroid_input", "encoder_adj_input"):
            shape = inputs[alias].shape
            if shape[:2] != (b, n) or (alias == "encoder_adj_input" and shape[2] != n):
                raise InputError(f"input '{alias}' has shape {list(shape)}; the frames and cells of "
                                 f"encoder_morph_input are {[b, n]}")

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        emb = np.zeros(inputs["encoder_morph_input"].shape[:2] + (EMBEDDING_DIM,), np.float32)
        for i in range(emb.shape[0]):
            try:
                emb[i] = encode(inputs["encoder_app_input"][i], inputs["encoder_morph_input"][i],
                                inputs["encoder_adj_input"][i])
            except Degraded as err:
                log.warning("stand-in neighborhood encoder degraded: %s", err)
        return {"relu_nef": emb, "encoder_centroid_input": inputs["encoder_centroid_input"].copy()}


def encode(app: np.ndarray, morph: np.ndarray, adj: np.ndarray) -> np.ndarray:
    """(N, 64) embeddings of one frame's cells; raises Degraded for inputs unlike the training data's."""
    real = morph[:, 0] > 0
    out = np.zeros((len(morph), EMBEDDING_DIM), np.float32)
    if not real.any():
        return out
    area, perimeter, ecc = (morph[real, k].astype(np.float64) for k in range(3))
    ratio = perimeter ** 2 / (4 * np.pi * area)
    if not (np.all((ecc >= 0) & (ecc <= 1)) and np.all((ratio > 0.4) & (ratio < 12))):
        raise Degraded("morphologies are not (area, perimeter, eccentricity) of cells")
    neighbours = _neighbours(adj, real)
    crops = app[real, ..., 0].astype(np.float64)
    std = crops.std(axis=(1, 2))
    if np.any(std < 1e-6):
        raise Degraded("a cell's appearance is blank: not a crop of the cell")
    norm = (crops - crops.mean(axis=(1, 2), keepdims=True)) / std[:, None, None]
    a = norm.shape[1] // POOL
    pooled = norm[:, :a * POOL, :a * POOL].reshape(len(norm), POOL, a, POOL, a).mean(axis=(2, 4))
    out[real, 0] = np.sqrt(area)
    out[real, 1] = perimeter / np.sqrt(area)
    out[real, 2] = ecc
    out[real, 3] = neighbours
    out[real, 4:4 + POOL * POOL] = pooled.reshape(len(norm), -1)
    return out


def _neighbours(adj: np.ndarray, real: np.ndarray) -> np.ndarray:
    """Neighbours of each real cell, recovered from a normalised adjacency D^-1/2 A D^-1/2.

    Its diagonal is 1 / degree (every cell neighbours itself), from which A comes back as
    0/1 with row sums equal to the degrees; anything else was not normalised that way.
    """
    adj = adj.astype(np.float64)
    diag = np.diag(adj)
    if np.any(diag[real] <= 0) or not np.allclose(adj, adj.T, atol=1e-5):
        raise Degraded("adjacency is not a symmetric matrix with self-loops")
    deg = 1.0 / np.where(diag > 0, diag, 1.0)
    binary = adj * np.sqrt(np.outer(deg, deg))
    if not np.allclose(binary, np.round(binary), atol=1e-2) or \
            not np.allclose(binary.sum(axis=1)[real], deg[real], rtol=1e-2):
        raise Degraded("adjacency is not normalised as D^-1/2 A D^-1/2")
    return np.round(binary[real][:, real]).sum(axis=1) - 1


@dataclass
class TrackingInferenceModel(Model):
    """Track histories and a frame's cells -> (same, different, daughter) per pair."""

    def __post_init__(self) -> None:
        e = EMBEDDING_DIM
        self.inputs = {
            "current_embeddings": TensorSpec("serving_default_current_embeddings:0", "float32", (-1, -1, -1, e)),
            "current_centroids": TensorSpec("serving_default_current_centroids:0", "float32", (-1, -1, -1, 2)),
            "future_embeddings": TensorSpec("serving_default_future_embeddings:0", "float32", (-1, 1, -1, e)),
            "future_centroids": TensorSpec("serving_default_future_centroids:0", "float32", (-1, 1, -1, 2)),
        }
        self.outputs = {"tracking_decoder": TensorSpec("StatefulPartitionedCall:0", "float32",
                                                       (-1, 1, -1, -1, 3))}

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        cur_e, cur_c = inputs["current_embeddings"], inputs["current_centroids"]
        fut_e, fut_c = inputs["future_embeddings"], inputs["future_centroids"]
        out = np.stack([link_probabilities(cur_e[b, -1], cur_c[b, -1], fut_e[b, 0], fut_c[b, 0])
                        for b in range(cur_e.shape[0])])
        return {"tracking_decoder": out[:, np.newaxis].astype(np.float32)}


def link_probabilities(track_emb: np.ndarray, track_cent: np.ndarray, cell_emb: np.ndarray,
                       cell_cent: np.ndarray) -> np.ndarray:
    """(tracks, cells, 3) softmax of (same, different, daughter) scores."""
    area_t = track_emb[:, 0].astype(np.float64) ** 2
    area_c = cell_emb[:, 0].astype(np.float64) ** 2
    dist = np.sqrt(((cell_cent[None, :, :].astype(np.float64) - track_cent[:, None, :]) ** 2).sum(-1))
    valid = (area_t[:, None] > 0) & (area_c[None, :] > 0)
    ratio = np.where(valid, area_c[None, :] / np.where(area_t > 0, area_t, 1.0)[:, None], 1.0)
    same = 4.0 - (dist / 3.0) ** 2 - (np.log(ratio) / 0.35) ** 2
    radius = np.sqrt(area_t / np.pi)[:, None]
    daughter = np.where((ratio >= 0.25) & (ratio <= 0.85) & (dist <= 1.6 * radius),
                        6.0 - ((ratio - 0.5) / 0.2) ** 2, -20.0)
    logits = np.stack([np.where(valid, same, -20.0), np.zeros_like(same), np.where(valid, daughter, -20.0)],
                      axis=-1)
    logits -= logits.max(axis=-1, keepdims=True)
    p = np.exp(logits)
    return p / p.sum(axis=-1, keepdims=True)
