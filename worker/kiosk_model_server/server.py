"""A TF-Serving-compatible gRPC server for tests and demos.

Speaks PredictionService (Predict, GetModelMetadata) and ModelService
(GetModelStatus) with TF Serving's method paths and messages, serves the
deterministic models of ``models.py``, and can inject latency and failures at
run time so fault handling is tested against a real gRPC peer.
"""

from __future__ import annotations

import collections
import logging
import threading
from collections.abc import Iterable
from concurrent import futures
from typing import Any

import grpc
import numpy as np

from kiosk_model_server.models import InputError, Model, build_model
from kiosk_worker.tfs.messages import decode_predict_request, encode_predict_response
from kiosk_worker.tfs.protos import get_model_metadata_pb2, get_model_status_pb2, meta_graph_pb2
from kiosk_worker.tfs.tensor import to_tf_dtype

__all__ = ["ModelServer", "status_code"]

log = logging.getLogger(__name__)


def status_code(code: grpc.StatusCode | str) -> grpc.StatusCode:
    """grpc.StatusCode from an enum member or its name ('UNAVAILABLE')."""
    if isinstance(code, grpc.StatusCode):
        return code
    try:
        return grpc.StatusCode[str(code).upper()]
    except KeyError:
        raise ValueError(f"unknown gRPC status code '{code}'") from None


class _Abort(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


class ModelServer:
    """In-process model server: ``ModelServer(models=["segmentation"]).start()``.

    ``port=0`` picks a free port (read ``.port`` after ``start``). ``models``
    holds Model objects or kind names for ``build_model``. ``fail_next`` and
    ``set_latency`` change behaviour while running; ``calls`` counts RPCs per
    method so tests can assert how often a client tried; ``predicted`` records
    the model, version and input shapes of the latest Predict calls that reached a model.
    """

    def __init__(
        self,
        models: Iterable[Model | str] = ("segmentation", "null"),
        host: str = "127.0.0.1",
        port: int = 0,
        latency_ms: float = 0.0,
        versions: Iterable[int] = (1,),
        tile: int | None = None,
        max_workers: int = 16,
        max_message_bytes: int = -1,
    ) -> None:
        vers = tuple(int(v) for v in versions)
        built = [m if isinstance(m, Model) else build_model(m, versions=vers, tile=tile)
                 for m in models]
        self.models: dict[str, Model] = {m.name: m for m in built}
        self.host = host
        self._requested_port = int(port)
        self.port = 0
        self._latency = max(0.0, float(latency_ms)) / 1000.0
        self._max_workers = max_workers
        self._max_message_bytes = max_message_bytes
        self._lock = threading.Lock()
        self._fail_count = 0
        self._fail_code = grpc.StatusCode.UNAVAILABLE
        self._stopping = threading.Event()
        self._server: grpc.Server | None = None
        self.calls: collections.Counter[str] = collections.Counter()
        self.predicted: collections.deque[tuple[str, int, dict[str, tuple[int, ...]]]] = \
            collections.deque(maxlen=10000)

    # -- runtime control -------------------------------------------------
    def fail_next(self, n: int, code: grpc.StatusCode | str = "UNAVAILABLE") -> None:
        """Make the next ``n`` RPCs (any method) fail with ``code``."""
        with self._lock:
            self._fail_count = max(0, int(n))
            self._fail_code = status_code(code)

    def set_latency(self, ms: float) -> None:
        """Delay every RPC by ``ms`` milliseconds before it is handled."""
        self._latency = max(0.0, float(ms)) / 1000.0

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self) -> ModelServer:
        """Bind and serve in background threads; returns self."""
        options = [("grpc.max_receive_message_length", self._max_message_bytes),
                   ("grpc.max_send_message_length", self._max_message_bytes),
                   ("grpc.so_reuseport", 0)]
        server = grpc.server(futures.ThreadPoolExecutor(self._max_workers), options=options)
        server.add_generic_rpc_handlers(self._handlers())
        try:
            self.port = server.add_insecure_port(f"{self.host}:{self._requested_port}")
        except RuntimeError:
            self.port = 0
        if not self.port:
            raise RuntimeError(f"cannot listen on {self.host}:{self._requested_port}"
                               " (address in use or not local)")
        self._stopping.clear()
        server.start()
        self._server = server
        log.info("model server listening on %s (models: %s)", self.address,
                 ", ".join(f"{m.name}{list(m.versions)}" for m in self.models.values()))
        return self

    def stop(self, grace: float | None = 0.5) -> None:
        """Stop serving; in-flight calls get ``grace`` seconds."""
        self._stopping.set()
        if self._server is not None:
            self._server.stop(grace).wait()
            self._server = None

    def wait(self) -> None:
        """Block until the server stops."""
        if self._server is not None:
            self._server.wait_for_termination()

    def __enter__(self) -> ModelServer:
        return self.start() if self._server is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- gRPC plumbing ---------------------------------------------------
    def _handlers(self) -> tuple[grpc.GenericRpcHandler, ...]:
        md = get_model_metadata_pb2
        st = get_model_status_pb2
        prediction = grpc.method_handlers_generic_handler("tensorflow.serving.PredictionService", {
            # Predict takes and returns raw bytes: responses are hand-encoded (tensor_content).
            "Predict": grpc.unary_unary_rpc_method_handler(self._wrap("Predict", self._predict)),
            "GetModelMetadata": grpc.unary_unary_rpc_method_handler(
                self._wrap("GetModelMetadata", self._metadata),
                request_deserializer=md.GetModelMetadataRequest.FromString,
                response_serializer=md.GetModelMetadataResponse.SerializeToString),
        })
        status = grpc.method_handlers_generic_handler("tensorflow.serving.ModelService", {
            "GetModelStatus": grpc.unary_unary_rpc_method_handler(
                self._wrap("GetModelStatus", self._status),
                request_deserializer=st.GetModelStatusRequest.FromString,
                response_serializer=st.GetModelStatusResponse.SerializeToString),
        })
        return prediction, status

    def _wrap(self, method: str, fn: Any) -> Any:
        def handler(request: Any, context: grpc.ServicerContext) -> Any:
            with self._lock:
                self.calls[method] += 1
            if self._latency:
                self._stopping.wait(self._latency)
            with self._lock:
                fault = self._fail_count > 0
                if fault:
                    self._fail_count -= 1
                code = self._fail_code
            if fault:
                context.abort(code, f"injected fault: {code.name}")
            try:
                return fn(request)
            except _Abort as err:
                context.abort(err.code, str(err))
            except Exception as err:  # a bug in a model: report it, keep serving
                log.exception("%s failed", method)
                context.abort(grpc.StatusCode.INTERNAL, f"{type(err).__name__}: {err}")
        return handler

    def _resolve(self, name: str, version: int | None) -> tuple[Model, int]:
        model = self.models.get(name)
        if version is None:
            if model is None:
                raise _Abort(grpc.StatusCode.NOT_FOUND,
                             f"Servable not found for request: Latest({name})")
            return model, max(model.versions)
        if model is None or version not in model.versions:
            raise _Abort(grpc.StatusCode.NOT_FOUND,
                         f"Servable not found for request: Specific({name}, {version})")
        return model, version

    @staticmethod
    def _check_signature(name: str) -> None:
        if name not in ("", "serving_default"):
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT,
                         f'Serving signature key "{name}" not found.')

    def _predict(self, raw: bytes) -> bytes:
        try:
            call = decode_predict_request(raw)
        except (ValueError, TypeError) as err:
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, str(err)) from None
        except Exception:
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, "malformed PredictRequest") from None
        model, version = self._resolve(call.model_name, call.model_version)
        self._check_signature(call.signature_name)
        try:
            model.check(call.inputs)
        except InputError as err:
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, str(err)) from None
        with self._lock:
            self.predicted.append((model.name, version, {k: tuple(v.shape) for k, v in call.inputs.items()}))
        outputs = model.run(call.inputs)
        if call.output_filter:
            unknown = sorted(set(call.output_filter) - set(outputs))
            if unknown:
                raise _Abort(grpc.StatusCode.INVALID_ARGUMENT,
                             f"output tensor alias not found in signature: {unknown}")
            outputs = {k: outputs[k] for k in call.output_filter}
        return encode_predict_response(outputs, model.name, version, "serving_default")

    def _metadata(self, request: Any) -> Any:
        spec = request.model_spec
        model, version = self._resolve(
            spec.name, spec.version.value if spec.HasField("version") else None)
        fields = list(request.metadata_field)
        if not fields:
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT,
                         "GetModelMetadataRequest must specify at least one metadata_field")
        for field in fields:
            if field != "signature_def":
                raise _Abort(grpc.StatusCode.INVALID_ARGUMENT,
                             f"Metadata field {field} is not supported")
        sig_map = get_model_metadata_pb2.SignatureDefMap()
        sig = sig_map.signature_def["serving_default"]
        sig.method_name = "tensorflow/serving/predict"
        for target, specs in ((sig.inputs, model.inputs), (sig.outputs, model.outputs)):
            for alias, tspec in specs.items():
                info: meta_graph_pb2.TensorInfo = target[alias]
                info.name = tspec.name
                info.dtype = to_tf_dtype(np.dtype(tspec.dtype))
                for size in tspec.shape:
                    info.tensor_shape.dim.add(size=size)
        resp = get_model_metadata_pb2.GetModelMetadataResponse()
        resp.model_spec.name = model.name
        resp.model_spec.version.value = version
        resp.metadata["signature_def"].Pack(sig_map)
        return resp

    def _status(self, request: Any) -> Any:
        spec = request.model_spec
        model = self.models.get(spec.name)
        if model is None:
            raise _Abort(grpc.StatusCode.NOT_FOUND,
                         f"Could not find any versions of model {spec.name}")
        wanted = [spec.version.value] if spec.HasField("version") else sorted(model.versions)
        resp = get_model_status_pb2.GetModelStatusResponse()
        for v in wanted:
            if v not in model.versions:
                raise _Abort(grpc.StatusCode.NOT_FOUND,
                             f"Could not find version {v} of model {spec.name}")
            entry = resp.model_version_status.add(version=v)
            entry.state = get_model_status_pb2.ModelVersionStatus.AVAILABLE
        return resp
