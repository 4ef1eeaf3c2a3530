"""numpy <-> tensorflow.TensorProto without TensorFlow.

Encoding writes the serialized TensorProto bytes directly (varint headers plus
the array's own buffer), which is what makes numpy -> PredictRequest run at
memory speed instead of the per-element ``float_val`` lists upstream used.
Decoding accepts ``tensor_content`` and every typed ``*_val`` field, from our
generated messages or TensorFlow's own (they share attribute names).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from kiosk_worker.tfs.wire import Parts, bytes_field, varint

__all__ = [
    "DT_NAMES",
    "dtype_from_name",
    "dtype_name",
    "from_tf_dtype",
    "tensor_parts",
    "tensor_to_bytes",
    "to_ndarray",
    "to_tf_dtype",
]

# tensorflow.DataType enum values (tensorflow/core/framework/types.proto).
DT_NAMES: dict[int, str] = {
    1: "DT_FLOAT", 2: "DT_DOUBLE", 3: "DT_INT32", 4: "DT_UINT8", 5: "DT_INT16",
    6: "DT_INT8", 7: "DT_STRING", 8: "DT_COMPLEX64", 9: "DT_INT64", 10: "DT_BOOL",
    11: "DT_QINT8", 12: "DT_QUINT8", 13: "DT_QINT32", 14: "DT_BFLOAT16",
    15: "DT_QINT16", 16: "DT_QUINT16", 17: "DT_UINT16", 18: "DT_COMPLEX128",
    19: "DT_HALF", 20: "DT_RESOURCE", 21: "DT_VARIANT", 22: "DT_UINT32", 23: "DT_UINT64",
    24: "DT_FLOAT8_E5M2", 25: "DT_FLOAT8_E4M3FN", 26: "DT_FLOAT8_E4M3FNUZ",
    27: "DT_FLOAT8_E4M3B11FNUZ", 28: "DT_FLOAT8_E5M2FNUZ", 29: "DT_INT4", 30: "DT_UINT4",
    31: "DT_INT2", 32: "DT_UINT2", 33: "DT_FLOAT4_E2M1FN",
}
_NAME_TO_DT = {v: k for k, v in DT_NAMES.items()}

_NP_TO_DT: dict[np.dtype, int] = {
    np.dtype(np.float32): 1, np.dtype(np.float64): 2, np.dtype(np.int32): 3,
    np.dtype(np.uint8): 4, np.dtype(np.int16): 5, np.dtype(np.int8): 6,
    np.dtype(np.complex64): 8, np.dtype(np.int64): 9, np.dtype(np.bool_): 10,
    np.dtype(np.uint16): 17, np.dtype(np.complex128): 18, np.dtype(np.float16): 19,
    np.dtype(np.uint32): 22, np.dtype(np.uint64): 23,
}
# Quantized types decode to their storage type; bfloat16 widens to float32.
_DT_TO_NP: dict[int, np.dtype] = {v: k for k, v in _NP_TO_DT.items()}
_DT_TO_NP.update({
    7: np.dtype(object), 11: np.dtype(np.int8), 12: np.dtype(np.uint8),
    13: np.dtype(np.int32), 15: np.dtype(np.int16), 16: np.dtype(np.uint16),
    14: np.dtype(np.float32),
})
# Which repeated field carries the values of each dtype when tensor_content is empty.
_VAL_FIELD: dict[int, str] = {
    1: "float_val", 2: "double_val", 3: "int_val", 4: "int_val", 5: "int_val",
    6: "int_val", 7: "string_val", 8: "scomplex_val", 9: "int64_val", 10: "bool_val",
    11: "int_val", 12: "int_val", 13: "int_val", 14: "half_val", 15: "int_val",
    16: "int_val", 17: "int_val", 18: "dcomplex_val", 19: "half_val",
    22: "uint32_val", 23: "uint64_val",
}
_DT_BFLOAT16 = 14
_DT_STRING = 7


def to_tf_dtype(dtype: Any) -> int:
    """Map a numpy dtype to the tensorflow.DataType enum value."""
    dt = np.dtype(dtype)
    try:
        return _NP_TO_DT[dt.newbyteorder("=")]
    except KeyError:
        if dt.kind in "OSU":
            return _DT_STRING
        raise TypeError(f"numpy dtype {dt} has no TensorFlow equivalent") from None


def from_tf_dtype(tf_dtype: int) -> np.dtype:
    """Map a tensorflow.DataType enum value to the numpy dtype we decode it to."""
    try:
        return _DT_TO_NP[int(tf_dtype)]
    except KeyError:
        raise TypeError(f"TensorFlow dtype {dtype_name(tf_dtype)} is not supported") from None


def dtype_name(tf_dtype: int) -> str:
    """'DT_FLOAT' style name of a DataType value (what TF Serving metadata shows)."""
    return DT_NAMES.get(int(tf_dtype), f"DT_{int(tf_dtype)}")


def dtype_from_name(name: str) -> int:
    """Inverse of dtype_name; accepts 'DT_FLOAT', 'float' or 'float32'."""
    key = str(name).upper()
    if key in _NAME_TO_DT:
        return _NAME_TO_DT[key]
    if "DT_" + key in _NAME_TO_DT:
        return _NAME_TO_DT["DT_" + key]
    return to_tf_dtype(np.dtype(str(name).lower()))


def _shape_bytes(shape: tuple[int, ...]) -> bytes:
    """Serialized TensorShapeProto: one Dim{size} per axis (size 0 -> empty Dim)."""
    out = bytearray()
    for size in shape:
        dim = b"\x08" + varint(size) if size else b""
        out += b"\x12" + varint(len(dim)) + dim
    return bytes(out)


def tensor_parts(array: Any) -> Parts:
    """Serialized TensorProto of ``array`` as a list of buffers plus its length.

    The array's memory is referenced, not copied, so the caller can join the
    whole message in one pass. Numeric arrays use ``tensor_content``
    (little-endian, row-major, as TensorFlow does); string arrays ``string_val``.
    """
    arr = np.asarray(array)
    tf_dtype = to_tf_dtype(arr.dtype)
    shape = _shape_bytes(arr.shape)
    head = b"\x08" + varint(tf_dtype) + b"\x12" + varint(len(shape)) + shape
    if tf_dtype == _DT_STRING:
        vals = b"".join(bytes_field(8, v if isinstance(v, bytes) else str(v).encode())
                        for v in arr.ravel().tolist())
        return [head, vals], len(head) + len(vals)
    if arr.dtype.byteorder == ">":
        arr = arr.astype(arr.dtype.newbyteorder("<"))
    if arr.nbytes == 0:
        return [head], len(head)
    flat = np.ascontiguousarray(arr).reshape(-1).view(np.uint8)
    head += b"\x22" + varint(flat.nbytes)
    return [head, flat], len(head) + flat.nbytes


def tensor_to_bytes(array: Any) -> bytes:
    """Serialized TensorProto of ``array`` (tensor_content encoding)."""
    parts, _ = tensor_parts(array)
    return b"".join(parts)


def _fill(values: np.ndarray, size: int, dtype: np.dtype) -> np.ndarray:
    """Apply TensorFlow's repeated-field rule: 0 values -> zeros, fewer -> pad with last."""
    n = values.shape[0]
    if n == size:
        return values
    if n > size:
        raise ValueError(f"tensor has {n} values but its shape holds {size}")
    if n == 0:
        return np.full(size, b"", object) if dtype.kind == "O" else np.zeros(size, dtype=dtype)
    out = np.empty(size, dtype=values.dtype)
    out[:n] = values
    out[n:] = values[-1]
    return out


def _bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


def to_ndarray(tensor: Any, copy: bool = True) -> np.ndarray:
    """Decode a TensorProto (ours or TensorFlow's) into a numpy array.

    ``copy=False`` returns a read-only view of ``tensor_content`` when possible.
    bfloat16 is widened to float32 because numpy has no bfloat16.
    """
    tf_dtype = int(tensor.dtype)
    dtype = from_tf_dtype(tf_dtype)
    if tensor.tensor_shape.unknown_rank:
        raise ValueError("tensor has unknown rank")
    shape = tuple(int(d.size) for d in tensor.tensor_shape.dim)
    size = math.prod(shape)  # exact ints; np.prod costs ~3 us per call
    content = tensor.tensor_content
    if content:
        if tf_dtype == _DT_STRING:
            raise ValueError("string tensors in tensor_content are not supported")
        if tf_dtype == _DT_BFLOAT16:
            flat = _bf16_to_f32(np.frombuffer(content, dtype="<u2"))
        else:
            flat = np.frombuffer(content, dtype=dtype.newbyteorder("<"))
            if copy or flat.dtype != dtype:
                flat = flat.astype(dtype)
        if flat.size != size:
            raise ValueError(f"tensor_content holds {flat.size} values, shape {shape} needs {size}")
        return flat.reshape(shape)
    field = _VAL_FIELD.get(tf_dtype)
    if field is None:
        raise TypeError(f"TensorFlow dtype {dtype_name(tf_dtype)} is not supported")
    raw = getattr(tensor, field)
    if tf_dtype == _DT_STRING:
        vals = np.empty(len(raw), dtype=object)
        vals[:] = list(raw)
    elif tf_dtype in (8, 18):  # complex: interleaved (real, imag) pairs
        parts = np.array(raw, dtype=np.float32 if tf_dtype == 8 else np.float64)
        if parts.size % 2:
            raise ValueError("complex tensor has an odd number of components")
        vals = parts.view(dtype)
    elif tf_dtype == 19:
        vals = np.array(raw, dtype=np.int32).astype(np.uint16).view(np.float16)
    elif tf_dtype == _DT_BFLOAT16:
        vals = _bf16_to_f32(np.array(raw, dtype=np.int32).astype(np.uint16))
    else:
        vals = np.array(raw, dtype=dtype)
    return _fill(vals, size, dtype).reshape(shape)
