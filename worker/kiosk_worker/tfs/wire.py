"""Protobuf wire-format primitives for hand-built messages.

Only what the tensor and predict encoders need: varints, length-delimited
fields, and the (buffers, length) pairs that let a whole message be joined
once without copying large payloads twice.
"""

from __future__ import annotations

from typing import Any

__all__ = ["Parts", "bytes_field", "tag", "varint"]

#: A serialized message as buffers to concatenate, plus their total length.
Parts = tuple[list[Any], int]

_MASK64 = (1 << 64) - 1
_SMALL = [bytes([i]) for i in range(128)]


def varint(value: int) -> bytes:
    """Base-128 varint; negative numbers as 64-bit two's complement (int64 rule)."""
    if 0 <= value < 128:
        return _SMALL[value]
    value &= _MASK64
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def tag(field: int, wire_type: int) -> bytes:
    """Field key: (field number << 3) | wire type."""
    return varint((field << 3) | wire_type)


def bytes_field(field: int, data: bytes) -> bytes:
    """A length-delimited field (string, bytes or sub-message)."""
    return tag(field, 2) + varint(len(data)) + data
