"""Typed readers of one ConsumerPool spec field: each checks what the CRD schema cannot and
raises SpecError with one line naming the field (e.g. spec.scaling.maxWorkers)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


class SpecError(ValueError):
    """The pool spec cannot be used; the message is one line naming the field."""


def _obj(data: Any, path: str) -> Mapping[str, Any]:
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise SpecError(f"{path}: must be an object")
    return data


def _int(data: Mapping[str, Any], key: str, path: str, minimum: int = 0) -> int:
    value = data.get(key)
    if isinstance(value, bool) or not isinstance(value, int):
        raise SpecError(f"{path}.{key}: must be an integer, not {value!r}")
    if value < minimum:
        raise SpecError(f"{path}.{key}: must be at least {minimum}, not {value}")
    return value


def _optional_num(
    data: Mapping[str, Any], key: str, path: str, minimum: float = 0.0, exclusive: bool = False
) -> float | None:
    value = data.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise SpecError(f"{path}.{key}: must be a number, not {value!r}")
    if value < minimum or (exclusive and value == minimum):
        word = "greater than" if exclusive else "at least"
        raise SpecError(f"{path}.{key}: must be {word} {minimum}, not {value}")
    return float(value)


def _num(data: Mapping[str, Any], key: str, path: str, minimum: float = 0.0, exclusive: bool = False) -> float:
    value = _optional_num(data, key, path, minimum, exclusive)
    if value is None:
        raise SpecError(f"{path}.{key}: is required")
    return value


def _str(data: Mapping[str, Any], key: str, path: str) -> str:
    value = data.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise SpecError(f"{path}.{key}: must be a string, not {value!r}")
    return value


def _bool(data: Mapping[str, Any], key: str, path: str) -> bool:
    value = data.get(key)
    if not isinstance(value, bool):
        raise SpecError(f"{path}.{key}: must be true or false, not {value!r}")
    return value


def _list(data: Mapping[str, Any], key: str, path: str) -> tuple[Any, ...]:
    value = data.get(key) or ()
    if not isinstance(value, list | tuple):
        raise SpecError(f"{path}.{key}: must be a list")
    return tuple(value)


def _port(data: Mapping[str, Any], key: str, path: str) -> int:
    value = _int(data, key, path, minimum=1)
    if value > 65535:
        raise SpecError(f"{path}.{key}: must be a port number between 1 and 65535, not {value}")
    return value


def _signed_int(data: Mapping[str, Any], key: str, path: str) -> int:
    value = data.get(key)
    if isinstance(value, bool) or not isinstance(value, int):
        raise SpecError(f"{path}.{key}: must be an integer, not {value!r}")
    return value
