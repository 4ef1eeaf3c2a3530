"""TFServingClient against kiosk-model-server over real gRPC (no mocks)."""

from __future__ import annotations

import random
import threading

import grpc
import numpy as np
import pytest
from google.protobuf import json_format

from harness.ports import free_port
from kiosk_model_server import ModelServer
from kiosk_protocol.backoff import capped_delay, jittered_delay
from kiosk_worker.tfs.client import (
    InvalidModelInput,
    MessageTooLarge,
    ModelNotFound,
    ModelServerUnavailable,
    TFServingClient,
    TFServingError,
    from_kiosk_cache,
    to_kiosk_cache,
)
from kiosk_worker.tfs.protos import get_model_metadata_pb2


def _image(shape=(1, 40, 30, 1), seed=0) -> np.ndarray:
    return np.random.default_rng(seed).random(shape, dtype=np.float32)


def _one_line(err: Exception) -> str:
    text = str(err)
    assert text and "\n" not in text and "Traceback" not in text
    return text


def test_predict_round_trip(client: TFServingClient, model_server: ModelServer) -> None:
    image = _image((2, 33, 17, 3))
    out = client.predict("identity", 1, {"image": image})
    assert set(out) == {"output"}
    np.testing.assert_array_equal(out["output"], image)
    seg = client.predict("segmentation", None, {"image": image[..., :1]})
    assert {k: v.shape for k, v in seg.items()} == {
        "foreground": (2, 33, 17, 1), "inner_distance": (2, 33, 17, 1)}
    assert all(v.dtype == np.float32 and v.flags.writeable for v in seg.values())
    only = client.predict("segmentation", "2", {"image": image[..., :1]}, output_filter=["foreground"])
    assert set(only) == {"foreground"}  # versions arrive as strings from Redis hashes
    assert model_server.calls["Predict"] == 3
    with pytest.raises(InvalidModelInput, match="model version 'latest' is not a number"):
        client.predict("segmentation", "latest", {"image": image})


def test_one_channel_is_reused(client: TFServingClient) -> None:
    client.predict("null", 1, {"image": _image()})
    channel = client._channel
    for _ in range(3):
        client.predict("null", 1, {"image": _image()})
    assert client._channel is channel is not None


def test_concurrent_predicts_share_the_client(client: TFServingClient) -> None:
    results: dict[int, np.ndarray] = {}

    def work(i: int) -> None:
        results[i] = client.predict("identity", 1, {"image": _image(seed=i)})["output"]

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert sorted(results) == list(range(8))
    for i, out in results.items():
        np.testing.assert_array_equal(out, _image(seed=i))


def test_metadata(client: TFServingClient) -> None:
    meta = client.get_model_metadata("mesmer", 2)
    assert meta["model_name"] == "mesmer" and meta["model_version"] == 2
    assert meta["method_name"] == "tensorflow/serving/predict"
    assert meta["inputs"] == {"image": {"name": "serving_default_image:0", "dtype": "DT_FLOAT",
                                        "shape": [-1, -1, -1, 2]}}
    assert set(meta["outputs"]) == {"foreground", "inner_distance"}
    latest = client.get_model_metadata("segmentation")
    assert latest["model_version"] == 2 and latest["inputs"]["image"]["shape"][-1] == 1


def test_kiosk_cache_format_matches_upstream_message_to_dict(client: TFServingClient) -> None:
    """Upstream caches MessageToDict(signature_def)['serving_default']['inputs'] in Redis."""
    meta = client.get_model_metadata("mesmer", 1)
    sig_map = get_model_metadata_pb2.SignatureDefMap()
    info = sig_map.signature_def["serving_default"].inputs["image"]
    info.name, info.dtype = "serving_default_image:0", 1
    for size in (-1, -1, -1, 2):
        info.tensor_shape.dim.add(size=size)
    upstream = json_format.MessageToDict(sig_map)["signatureDef"]["serving_default"]["inputs"]
    assert to_kiosk_cache(meta) == upstream
    assert from_kiosk_cache(upstream) == meta["inputs"]


@pytest.mark.parametrize("code", ["UNAVAILABLE", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED"])
def test_retry_succeeds_after_transient_failures(client: TFServingClient, model_server: ModelServer,
                                                 code: str) -> None:
    model_server.fail_next(2, code)
    out = client.predict("null", 1, {"image": _image()})
    assert out["foreground"].shape == (1, 40, 30, 1)
    assert model_server.calls["Predict"] == 3


def test_backoff_grows_capped_with_jitter(model_server: ModelServer) -> None:
    waits: list[float] = []
    tfs = TFServingClient("127.0.0.1", model_server.port, timeout=5, max_retries=4, backoff=0.001,
                          max_backoff=0.004, sleep=waits.append)  # record instead of sleeping
    model_server.fail_next(4, "UNAVAILABLE")
    tfs.predict("null", 1, {"image": _image()})
    tfs.close()
    bases = [0.001, 0.002, 0.004, 0.004]
    assert len(waits) == 4
    assert all(0.0 <= w <= b for w, b in zip(waits, bases, strict=True)), waits  # full jitter


def test_backoff_is_the_shared_retry_formula() -> None:
    """One backoff formula in the project: the client draws from retry.jittered_delay."""
    tfs = TFServingClient("127.0.0.1", 1, backoff=0.5, max_backoff=3.0)
    for n in range(6):
        random.seed(n)
        ours = tfs.delay(n)
        random.seed(n)
        assert ours == jittered_delay(n, 0.5, 3.0)
        assert 0.0 <= ours <= capped_delay(n, 0.5, 3.0)


def test_gives_up_after_max_retries(client: TFServingClient, model_server: ModelServer) -> None:
    model_server.fail_next(100, "UNAVAILABLE")
    with pytest.raises(ModelServerUnavailable) as info:
        client.predict("null", 1, {"image": _image()})
    text = _one_line(info.value)
    assert text.startswith(f"model server 127.0.0.1:{model_server.port} unreachable after 3 retries")
    assert info.value.code == grpc.StatusCode.UNAVAILABLE
    assert model_server.calls["Predict"] == 4


def test_deadline_exceeded_is_retried_then_reported(model_server: ModelServer) -> None:
    tfs = TFServingClient("127.0.0.1", model_server.port, timeout=0.2, max_retries=1, backoff=0.01)
    model_server.set_latency(2000)
    with pytest.raises(ModelServerUnavailable, match="after 1 retries.*DEADLINE_EXCEEDED"):
        tfs.predict("null", 1, {"image": _image()})
    model_server.set_latency(0)
    tfs.close()
    assert model_server.calls["Predict"] == 2


def test_shutdown_interrupts_backoff(model_server: ModelServer) -> None:
    stop = threading.Event()
    stop.set()  # e.g. SIGTERM arrived: the first backoff wait returns True at once
    tfs = TFServingClient("127.0.0.1", model_server.port, max_retries=5, backoff=30, sleep=stop.wait)
    model_server.fail_next(10, "UNAVAILABLE")
    with pytest.raises(ModelServerUnavailable, match="after 0 retries"):
        tfs.predict("null", 1, {"image": _image()})
    assert model_server.calls["Predict"] == 1
    tfs.close()


def test_server_down(model_server: ModelServer) -> None:
    port = free_port()
    tfs = TFServingClient("127.0.0.1", port, timeout=2, max_retries=2, backoff=0.01)
    with pytest.raises(ModelServerUnavailable) as info:
        tfs.get_model_metadata("segmentation", 1)
    assert _one_line(info.value).startswith(f"model server 127.0.0.1:{port} unreachable after 2 retries")


def test_reconnects_when_server_comes_back() -> None:
    port = free_port()
    servers: list[ModelServer] = []

    def start_server(delay: float) -> None:  # first retry: the server is back
        if not servers:
            servers.append(ModelServer(["null"], port=port).start())
        threading.Event().wait(delay)  # the client's real backoff, so gRPC can connect

    tfs = TFServingClient("127.0.0.1", port, timeout=5, max_retries=6, backoff=0.05, sleep=start_server)
    try:
        out = tfs.predict("null", 1, {"image": _image()})
        assert out["inner_distance"].shape == (1, 40, 30, 1)
        assert servers and servers[0].calls["Predict"] == 1
    finally:
        tfs.close()
        for server in servers:
            server.stop(grace=0)


def test_not_found_is_not_retried(client: TFServingClient, model_server: ModelServer) -> None:
    with pytest.raises(ModelNotFound) as info:
        client.predict("foo", 3, {"image": _image()})
    assert _one_line(info.value) == "model 'foo' version 3 is not served"
    with pytest.raises(ModelNotFound, match="model 'segmentation' version 9 is not served"):
        client.predict("segmentation", 9, {"image": _image()})
    with pytest.raises(ModelNotFound, match="^model 'foo' is not served$"):
        client.get_model_metadata("foo")
    assert model_server.calls["Predict"] == 2
    assert model_server.calls["GetModelMetadata"] == 1


def test_invalid_argument_is_not_retried(client: TFServingClient, model_server: ModelServer) -> None:
    with pytest.raises(InvalidModelInput) as info:
        client.predict("segmentation", 1, {"image": np.zeros((40, 30, 1), np.float32)})
    assert "rank 4" in _one_line(info.value)
    with pytest.raises(InvalidModelInput, match="must be float32, got uint8"):
        client.predict("segmentation", 1, {"image": np.zeros((1, 4, 4, 1), np.uint8)})
    with pytest.raises(InvalidModelInput, match=r"shape \[-1, -1, -1, 2\]"):
        client.predict("mesmer", 1, {"image": _image()})
    with pytest.raises(InvalidModelInput, match="do not match signature"):
        client.predict("segmentation", 1, {"pixels": _image()})
    assert model_server.calls["Predict"] == 4


def test_other_errors_fail_at_once(client: TFServingClient, model_server: ModelServer) -> None:
    model_server.fail_next(1, grpc.StatusCode.INTERNAL)
    with pytest.raises(TFServingError) as info:
        client.predict("null", 1, {"image": _image()})
    assert type(info.value) is TFServingError and info.value.code == grpc.StatusCode.INTERNAL
    assert _one_line(info.value) == "model server error INTERNAL: injected fault: INTERNAL"
    assert model_server.calls["Predict"] == 1


def test_max_message_size_honored(model_server: ModelServer) -> None:
    limit = 64 * 1024
    tfs = TFServingClient("127.0.0.1", model_server.port, timeout=5, max_retries=3, backoff=0.01,
                          max_message_bytes=limit)
    # Too large to send: refused locally, nothing reaches the server.
    with pytest.raises(MessageTooLarge, match="exceeds the 65536 byte gRPC limit"):
        tfs.predict("identity", 1, {"image": _image((1, 200, 200, 1))})
    assert model_server.calls["Predict"] == 0
    # Request fits (40 kB) but the two 40 kB outputs do not: rejected on receipt, not retried.
    with pytest.raises(MessageTooLarge) as info:
        tfs.predict("segmentation", 1, {"image": _image((1, 100, 100, 1))})
    assert "65536" in _one_line(info.value)
    assert model_server.calls["Predict"] == 1
    # Under the limit both ways: fine.
    out = tfs.predict("segmentation", 1, {"image": _image((1, 50, 50, 1))})
    assert out["foreground"].shape == (1, 50, 50, 1)
    tfs.close()
    big = TFServingClient("127.0.0.1", model_server.port, max_message_bytes=64 * 1024 * 1024)
    assert big.predict("identity", 1, {"image": _image((4, 512, 512, 2))})["output"].shape == (4, 512, 512, 2)
    big.close()
