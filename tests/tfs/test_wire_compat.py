"""Our hand-built messages against tensorflow-serving-api, byte for byte.

tensorflow-serving-api (and the TensorFlow it pulls in) is a test dependency:
these tests import it unconditionally and fail if it is missing.
"""

from __future__ import annotations

import os
import subprocess
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np
import pytest
import tensorflow as tf
from google.protobuf.descriptor import FieldDescriptor
from tensorflow_serving.apis import get_model_metadata_pb2 as tf_md
from tensorflow_serving.apis import get_model_status_pb2 as tf_st
from tensorflow_serving.apis import model_service_pb2 as tf_ms
from tensorflow_serving.apis import predict_pb2 as tf_predict
from tensorflow_serving.apis import prediction_service_pb2 as tf_ps

from kiosk_worker.tfs import messages, tensor
from kiosk_worker.tfs.protos import (
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_service_pb2,
    predict_pb2,
    prediction_service_pb2,
    tensor_pb2,
)

DTYPES = [np.float32, np.uint8, np.int32, np.float16, np.float64, np.int8, np.int16,
          np.int64, np.uint16, np.uint32, np.uint64, np.bool_, np.complex64, np.complex128]
SHAPES = [(1, 64, 48, 1), (2, 5, 3, 2), (7,), (3, 0, 2), ()]


def _array(dtype: type, shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    values = rng.normal(0, 50, size=shape)
    if np.dtype(dtype).kind == "c":
        values = values + 1j * rng.normal(0, 50, size=shape)
    if np.dtype(dtype).kind in "iu":
        info = np.iinfo(dtype)
        values = np.clip(values, info.min, info.max)
    return np.asarray(values).astype(dtype)


def _tf_tensor(arr: np.ndarray) -> tf.compat.v1.TensorProto:
    """TF's TensorProto with tensor_content set by hand (valid for every numeric dtype)."""
    proto = tf.make_tensor_proto(np.zeros((0,), arr.dtype))
    proto.ClearField("tensor_shape")
    proto.tensor_shape.SetInParent()  # present even for scalars, as TF does
    for size in arr.shape:
        proto.tensor_shape.dim.add(size=size)
    proto.tensor_content = np.ascontiguousarray(arr).tobytes()
    return proto


def _tf_request(inputs: dict[str, np.ndarray], name: str = "segmentation",
                version: int | None = 3, signature: str = "",
                output_filter: tuple[str, ...] = (), make=_tf_tensor) -> bytes:
    req = tf_predict.PredictRequest()
    req.model_spec.name = name
    if version is not None:
        req.model_spec.version.value = version
    if signature:
        req.model_spec.signature_name = signature
    for key, arr in inputs.items():
        req.inputs[key].CopyFrom(make(arr))
    req.output_filter.extend(output_filter)
    return req.SerializeToString(deterministic=True)


# -- descriptors ---------------------------------------------------------

def _repeated(field: FieldDescriptor) -> bool:
    if hasattr(field, "is_repeated"):  # protobuf >= 5.29; .label was removed in 7
        return bool(field.is_repeated)
    return field.label == FieldDescriptor.LABEL_REPEATED


def _compare_message(ours, theirs, seen: set[str]) -> None:
    assert ours.full_name == theirs.full_name
    if ours.full_name in seen:
        return
    seen.add(ours.full_name)
    their_fields = {f.name: f for f in theirs.fields}
    for f in ours.fields:
        t = their_fields.get(f.name)
        assert t is not None, f"{ours.full_name}.{f.name} does not exist upstream"
        where = f"{ours.full_name}.{f.name}"
        assert (f.number, f.type) == (t.number, t.type), where
        assert _repeated(f) == _repeated(t), where
        assert (f.containing_oneof is None) == (t.containing_oneof is None), where
        if f.message_type is not None:
            _compare_message(f.message_type, t.message_type, seen)
        if f.enum_type is not None:
            theirs_enum = {v.name: v.number for v in t.enum_type.values}
            for v in f.enum_type.values:
                assert theirs_enum.get(v.name) == v.number, f"{f.enum_type.full_name}.{v.name}"


@pytest.mark.parametrize(("ours", "theirs"), [
    (predict_pb2.PredictRequest, tf_predict.PredictRequest),
    (predict_pb2.PredictResponse, tf_predict.PredictResponse),
    (get_model_metadata_pb2.GetModelMetadataRequest, tf_md.GetModelMetadataRequest),
    (get_model_metadata_pb2.GetModelMetadataResponse, tf_md.GetModelMetadataResponse),
    (get_model_metadata_pb2.SignatureDefMap, tf_md.SignatureDefMap),
    (get_model_status_pb2.GetModelStatusRequest, tf_st.GetModelStatusRequest),
    (get_model_status_pb2.GetModelStatusResponse, tf_st.GetModelStatusResponse),
])
def test_descriptors_match_upstream(ours, theirs) -> None:
    """Every field we declare has upstream's name, number, type and cardinality."""
    _compare_message(ours.DESCRIPTOR, theirs.DESCRIPTOR, set())


@pytest.mark.parametrize(("ours", "theirs", "service"), [
    (prediction_service_pb2, tf_ps, "PredictionService"),
    (model_service_pb2, tf_ms, "ModelService"),
])
def test_service_methods_match_upstream(ours, theirs, service) -> None:
    mine = ours.DESCRIPTOR.services_by_name[service]
    upstream = theirs.DESCRIPTOR.services_by_name[service]
    assert mine.full_name == upstream.full_name
    for method in mine.methods:
        up = upstream.methods_by_name[method.name]
        assert method.full_name == up.full_name
        assert method.input_type.full_name == up.input_type.full_name
        assert method.output_type.full_name == up.output_type.full_name


# -- encoding: byte for byte --------------------------------------------

@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_predict_request_bytes_equal(dtype: type, shape: tuple[int, ...]) -> None:
    arr = _array(dtype, shape)
    ours = messages.encode_predict_request("segmentation", {"image": arr}, 3)
    assert ours == _tf_request({"image": arr})


@pytest.mark.parametrize("dtype", [np.float32, np.uint8, np.int32, np.float16, np.float64,
                                   np.int64, np.int8, np.int16, np.uint32, np.uint64],
                         ids=lambda d: np.dtype(d).name)
def test_predict_request_equals_make_tensor_proto(dtype: type) -> None:
    """Same bytes as the canonical upstream client path (tf.make_tensor_proto)."""
    arr = _array(dtype, (2, 32, 16, 2), seed=1)
    ours = messages.encode_predict_request("segmentation", {"image": arr}, 3)
    assert ours == _tf_request({"image": arr}, make=tf.make_tensor_proto)


@pytest.mark.parametrize("version", [None, 0, 1, 127, 128, 2**40])
def test_predict_request_model_spec_variants(version: int | None) -> None:
    arr = _array(np.float32, (1, 8, 8, 2))
    inputs = {"image": arr, "aux": _array(np.uint8, (1, 8)), "z": _array(np.int32, (3,))}
    ours = messages.encode_predict_request("mesmer", inputs, version, "serving_default",
                                           ["foreground", "inner_distance"])
    theirs = _tf_request(inputs, "mesmer", version, "serving_default",
                         ("foreground", "inner_distance"))
    assert ours == theirs


def test_string_tensor_bytes_equal() -> None:
    arr = np.array([[b"a", b""], [b"xyz", b"\xff" * 200]], dtype=object)
    ours = messages.encode_predict_request("m", {"s": arr}, 1)
    assert ours == _tf_request({"s": arr}, "m", 1, make=tf.make_tensor_proto)


def test_zero_copy_decode_view() -> None:
    arr = _array(np.float32, (3, 5))
    proto = tensor_pb2.TensorProto.FromString(tensor.tensor_to_bytes(arr))
    view = tensor.to_ndarray(proto, copy=False)
    np.testing.assert_array_equal(view, arr)
    assert not view.flags.writeable and tensor.to_ndarray(proto).flags.writeable


def test_predict_request_noncontiguous_and_big_endian() -> None:
    arr = _array(np.float32, (4, 6, 5, 2))[:, ::2, 1:, :1]
    assert not arr.flags.c_contiguous
    assert messages.encode_predict_request("m", {"x": arr}, 1) == _tf_request({"x": arr}, "m", 1)
    big = arr.astype(">f4")
    assert messages.encode_predict_request("m", {"x": big}, 1) == _tf_request({"x": arr}, "m", 1)


def test_large_request_bytes_equal() -> None:
    arr = _array(np.float32, (4, 512, 512, 2))
    assert messages.encode_predict_request("m", {"image": arr}, 2) == _tf_request({"image": arr}, "m", 2)


@pytest.mark.parametrize("dtype", [np.float32, np.uint8, np.int32, np.float16],
                         ids=lambda d: np.dtype(d).name)
def test_predict_response_bytes_equal(dtype: type) -> None:
    outputs = {"inner_distance": _array(dtype, (2, 16, 16, 1)),
               "foreground": _array(dtype, (2, 16, 16, 1), 2)}
    ours = messages.encode_predict_response(outputs, "segmentation", 4, "serving_default")
    resp = tf_predict.PredictResponse()
    resp.model_spec.name = "segmentation"
    resp.model_spec.version.value = 4
    resp.model_spec.signature_name = "serving_default"
    for key, arr in outputs.items():
        resp.outputs[key].CopyFrom(tf.make_tensor_proto(arr))
    assert ours == resp.SerializeToString(deterministic=True)


@pytest.mark.parametrize("version", [None, 1, 300])
def test_metadata_request_bytes_equal(version: int | None) -> None:
    req = tf_md.GetModelMetadataRequest()
    req.model_spec.name = "segmentation"
    if version is not None:
        req.model_spec.version.value = version
    req.metadata_field.append("signature_def")
    assert messages.encode_metadata_request("segmentation", version) == req.SerializeToString()


def test_generated_messages_serialize_like_upstream() -> None:
    """Our generated classes (used by the model server) also produce upstream's bytes."""
    sig_map = get_model_metadata_pb2.SignatureDefMap()
    info = sig_map.signature_def["serving_default"].inputs["image"]
    info.name, info.dtype = "serving_default_image:0", 1
    for size in (-1, 256, 256, 2):
        info.tensor_shape.dim.add(size=size)
    resp = get_model_metadata_pb2.GetModelMetadataResponse()
    resp.model_spec.name = "segmentation"
    resp.model_spec.version.value = 1
    resp.metadata["signature_def"].Pack(sig_map)

    their_map = tf_md.SignatureDefMap()
    tinfo = their_map.signature_def["serving_default"].inputs["image"]
    tinfo.name, tinfo.dtype = "serving_default_image:0", 1
    for size in (-1, 256, 256, 2):
        tinfo.tensor_shape.dim.add(size=size)
    theirs = tf_md.GetModelMetadataResponse()
    theirs.model_spec.name = "segmentation"
    theirs.model_spec.version.value = 1
    theirs.metadata["signature_def"].Pack(their_map)
    assert resp.SerializeToString(deterministic=True) == theirs.SerializeToString(deterministic=True)

    status = get_model_status_pb2.GetModelStatusResponse()
    status.model_version_status.add(version=2, state=30).status.error_message = "ok"
    their_status = tf_st.GetModelStatusResponse()
    their_status.model_version_status.add(version=2, state=30).status.error_message = "ok"
    assert status.SerializeToString() == their_status.SerializeToString()


# -- decoding upstream's messages ---------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_decode_make_tensor_proto(dtype: type) -> None:
    """Whatever encoding TF picks (tensor_content or typed *_val), we decode it."""
    arr = _array(dtype, (3, 4, 2))
    data = tf.make_tensor_proto(arr).SerializeToString()
    got = tensor.to_ndarray(tensor_pb2.TensorProto.FromString(data))
    assert got.dtype == arr.dtype and got.shape == arr.shape
    np.testing.assert_array_equal(got, arr)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_tf_decodes_ours(dtype: type) -> None:
    arr = _array(dtype, (2, 3, 5))
    proto = tf.make_tensor_proto(np.zeros(0, np.float32))
    proto.ParseFromString(tensor.tensor_to_bytes(arr))
    np.testing.assert_array_equal(tf.make_ndarray(proto), arr)


@pytest.mark.parametrize(("field", "dtype", "values", "expected_dtype"), [
    ("float_val", tf.float32, [1.5, -2.0, 3.25, 4.0, 5.0, 6.0], np.float32),
    ("double_val", tf.float64, [1e300, -2.0, 3.0, 4.0, 5.0, 6.0], np.float64),
    ("int_val", tf.int32, [1, -2, 3, 4, 5, 2**31 - 1], np.int32),
    ("int_val", tf.uint8, [0, 1, 2, 3, 254, 255], np.uint8),
    ("int_val", tf.int16, [0, -1, 2, 3, 4, 5], np.int16),
    ("int64_val", tf.int64, [2**40, -1, 2, 3, 4, 5], np.int64),
    ("bool_val", tf.bool, [True, False, True, True, False, False], np.bool_),
    ("uint32_val", tf.uint32, [0, 1, 2**32 - 1, 3, 4, 5], np.uint32),
    ("uint64_val", tf.uint64, [0, 1, 2**64 - 1, 3, 4, 5], np.uint64),
])
def test_decode_typed_vals(field: str, dtype, values: list, expected_dtype: type) -> None:
    proto = tf.make_tensor_proto(np.zeros((2, 3), dtype.as_numpy_dtype))
    proto.ClearField("tensor_content")
    proto.ClearField(field)  # TF may have used the typed field itself (bool does)
    getattr(proto, field).extend(values)
    got = tensor.to_ndarray(tensor_pb2.TensorProto.FromString(proto.SerializeToString()))
    assert got.dtype == expected_dtype
    np.testing.assert_array_equal(got, np.array(values, dtype=expected_dtype).reshape(2, 3))
    np.testing.assert_array_equal(got, tf.make_ndarray(proto))


def test_decode_half_val_and_broadcast() -> None:
    values = np.array([0.5, -1.25, 65504.0], dtype=np.float16)
    proto = tf.make_tensor_proto(np.zeros((3,), np.float16))
    proto.ClearField("tensor_content")
    proto.half_val.extend(values.view(np.uint16).astype(int).tolist())
    np.testing.assert_array_equal(tensor.to_ndarray(proto), values)

    scalar = tf.make_tensor_proto(5.0, shape=[2, 3])  # a single float_val fills the shape
    assert len(scalar.float_val) == 1
    np.testing.assert_array_equal(tensor.to_ndarray(scalar), np.full((2, 3), 5.0, np.float32))

    padded = tf.make_tensor_proto(np.zeros((4,), np.int32))
    padded.ClearField("tensor_content")
    padded.int_val.extend([7, 9])  # fewer values: TF repeats the last one
    np.testing.assert_array_equal(tensor.to_ndarray(padded), tf.make_ndarray(padded))

    empty = tf.make_tensor_proto(np.zeros((2, 2), np.float32))
    empty.ClearField("tensor_content")  # no values at all: zeros
    np.testing.assert_array_equal(tensor.to_ndarray(empty), np.zeros((2, 2), np.float32))


def test_decode_strings_and_complex_vals() -> None:
    strings = tf.make_tensor_proto(np.array([b"a", b"bc", b""], dtype=object))
    assert list(tensor.to_ndarray(strings)) == [b"a", b"bc", b""]
    cplx = tf.make_tensor_proto(np.array([1 + 2j, 3 - 4j], dtype=np.complex64))
    np.testing.assert_array_equal(tensor.to_ndarray(cplx), np.array([1 + 2j, 3 - 4j], np.complex64))


def test_decode_upstream_predict_response() -> None:
    resp = tf_predict.PredictResponse()
    resp.model_spec.name = "segmentation"
    a = _array(np.float32, (1, 10, 12, 1))
    b = _array(np.int32, (1, 4))
    resp.outputs["inner_distance"].CopyFrom(tf.make_tensor_proto(a))
    resp.outputs["scores"].CopyFrom(tf.make_tensor_proto(b))
    resp.outputs["scalar"].CopyFrom(tf.make_tensor_proto(np.float32(2.5)))
    out = messages.decode_predict_response(resp.SerializeToString())
    np.testing.assert_array_equal(out["inner_distance"], a)
    np.testing.assert_array_equal(out["scores"], b)
    assert out["scalar"].shape == () and out["scalar"] == np.float32(2.5)
    assert out["inner_distance"].flags.writeable


def test_decode_rejects_inconsistent_content() -> None:
    proto = tf.make_tensor_proto(np.zeros((2, 2), np.float32))
    proto.tensor_content = b"\x00" * 12
    with pytest.raises(ValueError, match="needs 4"):
        tensor.to_ndarray(proto)


def test_dtype_names_round_trip() -> None:
    for dt in DTYPES:
        enum = tensor.to_tf_dtype(dt)
        assert tf.as_dtype(dt).as_datatype_enum == enum
        assert tensor.dtype_from_name(tensor.dtype_name(enum)) == enum
        assert tensor.from_tf_dtype(enum) == np.dtype(dt)
    assert tensor.dtype_from_name("float32") == tensor.dtype_from_name("DT_FLOAT") == 1
    with pytest.raises(TypeError, match="no TensorFlow equivalent"):
        tensor.to_tf_dtype(np.dtype("datetime64[s]"))


# -- both descriptor sets in one process ---------------------------------

@pytest.mark.parametrize("order", [
    "import kiosk_worker.tfs.client, tensorflow_serving.apis.prediction_service_pb2",
    "import tensorflow_serving.apis.prediction_service_pb2, kiosk_worker.tfs.client",
])
def test_coexists_with_tensorflow_serving_api(order: str) -> None:
    """Ours live in a private descriptor pool, so import order cannot cause a clash."""
    code = f"{order}; from kiosk_worker.tfs.protos import predict_pb2; print(predict_pb2.PredictRequest)"
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_client_does_not_import_tensorflow() -> None:
    code = ("import sys, kiosk_worker.tfs.client, kiosk_model_server;"
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'tensorflow_serving'));"
            "print(bad); sys.exit(1 if bad else 0)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
