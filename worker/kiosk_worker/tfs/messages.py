"""Serialized PredictRequest / PredictResponse / GetModelMetadataRequest.

Requests are built by hand (see tensor.py for why) and are byte-identical to
what tensorflow-serving-api produces with deterministic serialization: fields
in number order, map entries sorted by key. Responses are parsed with our
generated messages, which share TF Serving's field numbers.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple

import numpy as np

from kiosk_worker.tfs.protos import get_model_metadata_pb2, predict_pb2
from kiosk_worker.tfs.tensor import tensor_parts, to_ndarray
from kiosk_worker.tfs.wire import Parts, bytes_field, tag, varint

__all__ = [
    "PredictCall",
    "decode_predict_request",
    "decode_predict_response",
    "encode_metadata_request",
    "encode_predict_request",
    "encode_predict_response",
    "model_spec_bytes",
]


class PredictCall(NamedTuple):
    """A decoded PredictRequest (what the model server needs from it)."""

    model_name: str
    model_version: int | None
    signature_name: str
    inputs: dict[str, np.ndarray]
    output_filter: list[str]


def model_spec_bytes(name: str, version: int | None = None, signature_name: str = "") -> bytes:
    """Serialized ModelSpec; ``version`` goes in the Int64Value wrapper (field 2)."""
    out = bytes_field(1, name.encode()) if name else b""
    if version is not None:
        out += bytes_field(2, b"\x08" + varint(int(version)) if version else b"")
    if signature_name:
        out += bytes_field(3, signature_name.encode())
    return out


def _tensor_map(field: int, tensors: Mapping[str, Any]) -> Parts:
    """map<string, TensorProto> entries, sorted by key like deterministic protobuf."""
    parts: list[Any] = []
    total = 0
    for key in sorted(tensors):
        tparts, tlen = tensor_parts(tensors[key])
        kb = key.encode()
        inner = b"\x0a" + varint(len(kb)) + kb + b"\x12" + varint(tlen)
        head = tag(field, 2) + varint(len(inner) + tlen) + inner
        parts.append(head)
        parts.extend(tparts)
        total += len(head) + tlen
    return parts, total


def encode_predict_request(
    model_name: str,
    inputs: Mapping[str, Any],
    model_version: int | None = None,
    signature_name: str = "",
    output_filter: Iterable[str] = (),
) -> bytes:
    """Serialized PredictRequest, joined once from the arrays' own buffers."""
    spec = model_spec_bytes(model_name, model_version, signature_name)
    parts, _ = _tensor_map(2, inputs)
    tail = b"".join(bytes_field(3, name.encode()) for name in output_filter)
    return b"".join([bytes_field(1, spec), *parts, tail])


def encode_predict_response(
    outputs: Mapping[str, Any],
    model_name: str = "",
    model_version: int | None = None,
    signature_name: str = "",
) -> bytes:
    """Serialized PredictResponse (outputs = field 1 precede model_spec = field 2)."""
    parts, _ = _tensor_map(1, outputs)
    spec = b""
    if model_name or model_version is not None or signature_name:
        spec = bytes_field(2, model_spec_bytes(model_name, model_version, signature_name))
    return b"".join([*parts, spec])


def encode_metadata_request(
    model_name: str, model_version: int | None = None, fields: Iterable[str] = ("signature_def",)
) -> bytes:
    """Serialized GetModelMetadataRequest asking for ``fields``."""
    spec = bytes_field(1, model_spec_bytes(model_name, model_version))
    return spec + b"".join(bytes_field(2, f.encode()) for f in fields)


def decode_predict_response(data: bytes, copy: bool = True) -> dict[str, np.ndarray]:
    """Output tensors of a serialized PredictResponse, as numpy arrays."""
    resp = predict_pb2.PredictResponse.FromString(data)
    return {name: to_ndarray(t, copy=copy) for name, t in resp.outputs.items()}


def decode_predict_request(request: Any) -> PredictCall:
    """Decode a PredictRequest message (ours, or bytes of one)."""
    if isinstance(request, (bytes, bytearray, memoryview)):
        request = predict_pb2.PredictRequest.FromString(bytes(request))
    spec = request.model_spec
    version = spec.version.value if spec.HasField("version") else None
    inputs = {name: to_ndarray(t) for name, t in request.inputs.items()}
    return PredictCall(spec.name, version, spec.signature_name, inputs, list(request.output_filter))


def unpack_signature_defs(response: Any) -> Any:
    """SignatureDefMap from a GetModelMetadataResponse's ``signature_def`` Any."""
    sig_map = get_model_metadata_pb2.SignatureDefMap()
    any_msg = response.metadata["signature_def"]
    sig_map.ParseFromString(any_msg.value)
    return sig_map
