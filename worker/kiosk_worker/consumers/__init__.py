"""Consumer registry: built-ins plus the ``kiosk_worker.consumers`` entry-point group.

A third-party package adds a consumer without touching this code::

    # pyproject.toml of the package
    [project.entry-points."kiosk_worker.consumers"]
    mytype = "my_package.consumer:MyConsumer"

and the worker runs it with ``CONSUMER_TYPE=mytype``. Built-ins are imported
lazily so that a worker only pays for the consumer it runs.
"""

from __future__ import annotations

import importlib
import logging
from typing import TYPE_CHECKING, Any

from kiosk_protocol.settings import CONSUMER_ALIASES
from kiosk_worker.consumers.base import Consumer, TensorFlowServingConsumer

if TYPE_CHECKING:
    from importlib import metadata

__all__ = [
    "BUILTIN",
    "ENTRY_POINT_GROUP",
    "Consumer",
    "TensorFlowServingConsumer",
    "UnknownConsumer",
    "available",
    "get_consumer",
    "get_consumer_class",
]

log = logging.getLogger(__name__)
ENTRY_POINT_GROUP = "kiosk_worker.consumers"

#: consumer type -> "module:Class" (imported on demand).
BUILTIN: dict[str, str] = {
    "segmentation": "kiosk_worker.consumers.segmentation:SegmentationConsumer",
    "zip": "kiosk_worker.consumers.zip_parent:ZipConsumer",
    "tracking": "kiosk_worker.consumers.tracking:TrackingConsumer",
    "mesmer": "kiosk_worker.consumers.mesmer:MesmerConsumer",
    "spot": "kiosk_worker.consumers.spot:SpotConsumer",
    "polaris": "kiosk_worker.consumers.polaris:PolarisConsumer",
}


class UnknownConsumer(ValueError):
    """CONSUMER_TYPE names no built-in or installed consumer."""


def _entry_points() -> dict[str, metadata.EntryPoint]:
    from importlib import metadata  # ~15 ms; only needed for non-built-in consumer types

    return {ep.name.lower(): ep for ep in metadata.entry_points(group=ENTRY_POINT_GROUP)}


def available() -> list[str]:
    """Every consumer type this worker can run (aliases included)."""
    return sorted(set(BUILTIN) | set(CONSUMER_ALIASES) | set(_entry_points()))


def _load(target: str) -> type:
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)


def get_consumer_class(consumer_type: str) -> type[Consumer]:
    """The class for a type name (case-insensitive; ``image`` and ``caliban`` are aliases)."""
    kind = str(consumer_type).strip().lower()
    kind = CONSUMER_ALIASES.get(kind, kind)
    if kind in BUILTIN:
        cls = _load(BUILTIN[kind])
    else:
        ep = _entry_points().get(kind)
        if ep is None:
            raise UnknownConsumer(
                f"unknown consumer type '{consumer_type}' (CONSUMER_TYPE); "
                f"available: {', '.join(available())}")
        try:
            cls = ep.load()
        except Exception as err:
            raise UnknownConsumer(f"consumer type '{consumer_type}' from entry point '{ep.value}' "
                                  f"cannot be loaded: {type(err).__name__}: {err}") from None
    if not (isinstance(cls, type) and issubclass(cls, Consumer)):
        raise UnknownConsumer(f"consumer type '{consumer_type}' is not a kiosk_worker Consumer subclass")
    return cls


def get_consumer(consumer_type: str, **kwargs: Any) -> Consumer:
    """Build a consumer, as upstream's ``get_consumer(consumer_type, **kwargs)``.

    kwargs are those of ``Consumer.__init__``: redis_client, storage, queue,
    settings, store, name, tf_client, final_status, failed_status.
    """
    cls = get_consumer_class(consumer_type)
    log.debug("consumer %s -> %s.%s", consumer_type, cls.__module__, cls.__qualname__)
    return cls(**kwargs)
