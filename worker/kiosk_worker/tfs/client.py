"""TensorFlow Serving gRPC client that does not import TensorFlow.

One channel per client (so per worker), reused for every call. Transient
failures (UNAVAILABLE, DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED) are retried a
bounded number of times with capped exponential backoff and full jitter
(``kiosk_protocol.backoff.jittered_delay``, the formula every retry uses); everything
else fails at once. Every failure surfaces as a TFServingError subclass whose
message is one line a user can read (it ends up as a job's ``reason``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import grpc
import numpy as np

from kiosk_protocol import errors
from kiosk_protocol.backoff import jittered_delay
from kiosk_worker.tfs.messages import (
    decode_predict_response,
    encode_metadata_request,
    encode_predict_request,
    unpack_signature_defs,
)
from kiosk_worker.tfs.protos import get_model_metadata_pb2
from kiosk_worker.tfs.tensor import dtype_name

__all__ = [
    "InvalidModelInput",
    "MessageTooLarge",
    "ModelNotFound",
    "ModelServerUnavailable",
    "TFServingClient",
    "TFServingError",
    "from_kiosk_cache",
    "to_kiosk_cache",
]

log = logging.getLogger(__name__)

_PREDICT = "/tensorflow.serving.PredictionService/Predict"
_METADATA = "/tensorflow.serving.PredictionService/GetModelMetadata"
RETRYABLE = frozenset({
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
})
DEFAULT_MAX_MESSAGE_BYTES = 256 * 1024 * 1024


class TFServingError(Exception):
    """Base of every client error; ``str(err)`` is a one-line user message."""

    code: grpc.StatusCode | None = None

    def __init__(self, message: str, code: grpc.StatusCode | None = None) -> None:
        super().__init__(" ".join(str(message).split()))
        self.code = code


class ModelNotFound(TFServingError):
    """The model server does not serve that model or version (NOT_FOUND)."""


class InvalidModelInput(TFServingError):
    """The model server rejected the request (INVALID_ARGUMENT etc.)."""


class MessageTooLarge(TFServingError):
    """A request or response exceeds the configured gRPC message size."""


class ModelServerUnavailable(TFServingError):
    """Retryable failures persisted past ``max_retries``."""


#: Longest piece of a server's error message quoted in ours.
DETAIL_LIMIT = 200


def _detail(details: str | None) -> str:
    """A gRPC status message's first line (later ones may hold the server's traceback)."""
    lines = (details or "").strip().splitlines()
    return errors.one_line(lines[0] if lines else "", DETAIL_LIMIT)


def _version(value: int | str | None) -> int | None:
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    try:
        return int(value)
    except ValueError:
        raise InvalidModelInput(f"model version '{value}' is not a number") from None


def _model_ref(name: str, version: int | None) -> str:
    return f"model '{name}'" + (f" version {version}" if version is not None else "")


class TFServingClient:
    """Predict and GetModelMetadata against TF Serving (or kiosk-model-server).

    ``timeout`` is the per-call deadline in seconds, ``max_retries`` how many
    times a transient failure is retried, ``backoff`` the first retry delay in
    seconds (doubling per retry up to ``max_backoff``, with jitter), and
    ``max_message_bytes`` the gRPC send/receive limit. ``sleep`` waits between
    retries (default time.sleep); pass a shutdown ``threading.Event().wait`` so
    that SIGTERM interrupts a backoff: when it returns True, retrying stops.
    ``on_retry(method, code_name)`` is called before each retry (metrics).
    """

    def __init__(
        self,
        host: str,
        port: int,
        timeout: float = 30.0,
        max_retries: int = 5,
        backoff: float = 3.0,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        max_backoff: float = 60.0,
        sleep: Callable[[float], Any] | None = None,
        on_retry: Callable[[str, str], Any] | None = None,
    ) -> None:
        self.host = host
        self.port = int(port)
        self.timeout = float(timeout)
        self.max_retries = max(0, int(max_retries))
        self.backoff = max(0.0, float(backoff))
        self.max_backoff = max(self.backoff, float(max_backoff))
        self.max_message_bytes = int(max_message_bytes)
        self._lock = threading.Lock()
        self._channel: grpc.Channel | None = None
        self._predict: Callable[..., Any] | None = None
        self._metadata: Callable[..., Any] | None = None
        self._generation = 0
        self._sleep = sleep or time.sleep
        self.on_retry = on_retry

    @property
    def target(self) -> str:
        return f"{self.host}:{self.port}"

    def _stubs(self) -> tuple[int, Callable[..., Any], Callable[..., Any]]:
        """(generation, Predict, GetModelMetadata) of the current channel, creating it once."""
        with self._lock:
            if self._channel is None:
                options = [
                    ("grpc.max_send_message_length", self.max_message_bytes),
                    ("grpc.max_receive_message_length", self.max_message_bytes),
                    ("grpc.enable_retries", 0),  # retries are ours: bounded and logged
                ]
                channel = grpc.insecure_channel(self.target, options=options)
                # Requests are pre-serialized bytes, so no request_serializer.
                self._predict = channel.unary_unary(_PREDICT)
                self._metadata = channel.unary_unary(
                    _METADATA,
                    response_deserializer=get_model_metadata_pb2.GetModelMetadataResponse.FromString,
                )
                self._channel = channel
                self._generation += 1
            assert self._predict is not None and self._metadata is not None
            return self._generation, self._predict, self._metadata

    def _reset(self, generation: int) -> None:
        """Drop a channel that failed to connect so the next attempt dials at once.

        A gRPC channel that failed to connect waits out its own reconnect
        backoff (1 s growing to 120 s) and fails calls fast meanwhile, which
        would defeat our retry schedule. Threads still using the old channel
        keep it alive until their call ends; it closes when collected.
        """
        with self._lock:
            if generation == self._generation and self._channel is not None:
                self._channel = self._predict = self._metadata = None

    def close(self) -> None:
        """Close the channel (a later call reopens it)."""
        with self._lock:
            if self._channel is not None:
                self._channel.close()
            self._channel = self._predict = self._metadata = None

    def __enter__(self) -> TFServingClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def delay(self, retry: int) -> float:
        """Seconds to wait before retry number ``retry`` (0-based): the project's one backoff
        formula (``retry.jittered_delay``: backoff * 2**retry capped at max_backoff, full jitter)."""
        return jittered_delay(retry, self.backoff, self.max_backoff)

    def _call(self, what: str, name: str, version: int | None, payload: bytes) -> Any:
        """Send ``payload`` to Predict or GetModelMetadata with bounded retries."""
        retry = 0
        while True:
            generation, predict, metadata = self._stubs()
            call = predict if what == "Predict" else metadata
            try:
                return call(payload, timeout=self.timeout)
            except grpc.RpcError as err:
                code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
                details = err.details() if hasattr(err, "details") else str(err)
                too_large = "larger than max" in (details or "")
                if code == grpc.StatusCode.UNAVAILABLE:
                    self._reset(generation)
                if code in RETRYABLE and not too_large and retry < self.max_retries:
                    wait = self.delay(retry)
                    retry += 1
                    log.warning("%s %s failed with %s (%s); retry %d/%d in %.2fs",
                                what, self.target, code.name, _detail(details),
                                retry, self.max_retries, wait)
                    if self.on_retry is not None:
                        self.on_retry(what, code.name)
                    if self._sleep(wait) is True:  # interrupted (shutdown): stop retrying
                        raise self._error(code, details, name, version, retry - 1, too_large) from None
                    continue
                raise self._error(code, details, name, version, retry, too_large) from None

    def _error(self, code: grpc.StatusCode, details: str | None, name: str,
               version: int | None, retries: int, too_large: bool) -> TFServingError:
        detail = _detail(details)
        if too_large:
            return MessageTooLarge(
                f"message exceeds the {self.max_message_bytes} byte gRPC limit: {detail}", code)
        if code == grpc.StatusCode.NOT_FOUND:
            return ModelNotFound(f"{_model_ref(name, version)} is not served", code)
        if code in RETRYABLE:
            return ModelServerUnavailable(
                f"model server {self.target} unreachable after {retries} retries"
                f" ({code.name}: {detail})", code)
        if code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION,
                    grpc.StatusCode.OUT_OF_RANGE):
            return InvalidModelInput(f"{_model_ref(name, version)} rejected the input: {detail}",
                                     code)
        return TFServingError(f"model server error {code.name}: {detail}", code)

    def predict(
        self,
        model_name: str,
        model_version: int | str | None,
        inputs: Mapping[str, np.ndarray],
        output_filter: Iterable[str] | None = None,
        signature_name: str = "",
    ) -> dict[str, np.ndarray]:
        """Run the model on ``inputs`` (alias -> array); returns alias -> array.

        ``model_version`` may be the string from a Redis job hash; None or ''
        asks for the latest version.
        """
        version = _version(model_version)
        payload = encode_predict_request(model_name, inputs, version, signature_name,
                                         output_filter or ())
        if len(payload) > self.max_message_bytes:
            raise MessageTooLarge(
                f"request of {len(payload)} bytes exceeds the {self.max_message_bytes} byte"
                " gRPC limit; use smaller batches or tiles")
        return decode_predict_response(self._call("Predict", model_name, version, payload))

    def get_model_metadata(self, model_name: str, model_version: int | str | None = None,
                           signature_name: str = "serving_default") -> dict[str, Any]:
        """The serving signature as plain data.

        Returns ``{"model_name", "model_version", "signature_name", "method_name",
        "inputs": {alias: {"name", "dtype", "shape"}}, "outputs": {...}}`` where
        dtype is 'DT_FLOAT' style and shape a list of ints (-1 = any size).
        """
        version = _version(model_version)
        payload = encode_metadata_request(model_name, version)
        resp = self._call("GetModelMetadata", model_name, version, payload)
        if "signature_def" not in resp.metadata:
            raise TFServingError(f"{_model_ref(model_name, version)} returned no signature_def")
        sigs = unpack_signature_defs(resp).signature_def
        if signature_name not in sigs:
            raise InvalidModelInput(
                f"{_model_ref(model_name, version)} has no signature '{signature_name}'")
        sig = sigs[signature_name]
        served = resp.model_spec.version.value if resp.model_spec.HasField("version") else version
        return {
            "model_name": resp.model_spec.name or model_name,
            "model_version": served,
            "signature_name": signature_name,
            "method_name": sig.method_name,
            "inputs": {k: _tensor_info(v) for k, v in sorted(sig.inputs.items())},
            "outputs": {k: _tensor_info(v) for k, v in sorted(sig.outputs.items())},
        }


def _tensor_info(info: Any) -> dict[str, Any]:
    shape = None if info.tensor_shape.unknown_rank else [int(d.size) for d in info.tensor_shape.dim]
    return {"name": info.name, "dtype": dtype_name(info.dtype), "shape": shape}


def to_kiosk_cache(metadata: Mapping[str, Any]) -> dict[str, Any]:
    """Signature inputs in the form upstream Kiosk caches in Redis.

    Upstream stores ``json_format.MessageToDict`` of the serving_default
    inputs: ``{alias: {"name", "dtype", "tensorShape": {"dim": [{"size": "-1"}]}}}``
    (int64 sizes as strings, zero sizes omitted).
    """
    out: dict[str, Any] = {}
    for alias, info in metadata["inputs"].items():
        shape = info["shape"]
        if shape is None:
            tensor_shape: dict[str, Any] = {"unknownRank": True}
        else:
            tensor_shape = {"dim": [{"size": str(s)} if s else {} for s in shape]}
        entry: dict[str, Any] = {"dtype": info["dtype"], "tensorShape": tensor_shape}
        if info.get("name"):
            entry["name"] = info["name"]
        out[alias] = entry
    return out


def from_kiosk_cache(cached: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Inverse of to_kiosk_cache: ``{alias: {"name", "dtype", "shape"}}``."""
    out: dict[str, dict[str, Any]] = {}
    for alias, entry in cached.items():
        tshape = entry.get("tensorShape", {})
        shape = None if tshape.get("unknownRank") else [
            int(d.get("size", 0)) for d in tshape.get("dim", [])]
        out[alias] = {"name": entry.get("name", ""), "dtype": entry.get("dtype", "DT_INVALID"),
                      "shape": shape}
    return out
