"""Redis key names of the Kiosk protocol.

* ``{queue}``                      list of job keys; producers LPUSH, consumers take the right end.
* ``{queue}:{image}:{uuid4}``      job hash (kiosk_protocol.fields).
* ``processing-{queue}:{worker}``  in-flight job keys of one worker (Kiosk name).
* ``kiosk:workers:{queue}``        ZSET worker name -> last heartbeat (unix seconds); lets the
  operator find every processing list in O(workers), never SCAN.
* ``kiosk:worker:{worker}``        hash with the worker's live facts, expires with the heartbeat.
* ``{model}:{version}``            model metadata cache, field ``metadata``.
* ``kiosk:dead-letter:{queue}``    list of items taken from ``{queue}`` (or a processing list of
  it) that were not job hashes (WRONGTYPE: a string, a list...), newest on the left, capped at
  DEAD_LETTER_MAX; workers and reclaim move them here instead of failing on them.
"""

from __future__ import annotations

import datetime
import os
import uuid
from typing import Any

ZIP_SUFFIX = "-zip"
PROCESSING_PREFIX = "processing-"
WORKERS_PREFIX = "kiosk:workers:"
WORKER_INFO_PREFIX = "kiosk:worker:"
METADATA_FIELD = "metadata"
DEAD_LETTER_PREFIX = "kiosk:dead-letter:"
#: The dead-letter list of a queue keeps its newest this many items.
DEAD_LETTER_MAX = 10000


def queue_for_file(queue: str, filename: str) -> str:
    """Kiosk routes archives to a sibling queue handled by the zip consumer."""
    return queue + ZIP_SUFFIX if filename.lower().endswith(".zip") else queue


def job_key(queue: str, image_name: str, job_id: str | None = None) -> str:
    return f"{queue}:{image_name}:{job_id or uuid.uuid4()}"


def queue_of_key(key: str) -> str:
    """The queue a job key was submitted to (the part before the first ':')."""
    return key.split(":", 1)[0]


def processing_key(queue: str, worker: str) -> str:
    return f"{PROCESSING_PREFIX}{queue}:{worker}"


def workers_key(queue: str) -> str:
    return WORKERS_PREFIX + queue


def worker_info_key(worker: str) -> str:
    return WORKER_INFO_PREFIX + worker


def dead_letter_key(queue: str) -> str:
    """Where items of ``queue`` that are not job hashes go (see the module docstring)."""
    return DEAD_LETTER_PREFIX + queue


def metadata_key(model_name: str, model_version: Any) -> str:
    """The Kiosk's model-metadata cache hash (field METADATA_FIELD)."""
    return f"{model_name}:{model_version}"


def parse_processing_key(key: str) -> tuple[str, str] | None:
    """Split ``processing-{queue}:{worker}`` into (queue, worker); None if not one."""
    if not key.startswith(PROCESSING_PREFIX) or ":" not in key:
        return None
    queue, worker = key[len(PROCESSING_PREFIX) :].rsplit(":", 1)
    return queue, worker


def utc_now_iso() -> str:
    """Kiosk timestamps: ISO 8601 in UTC with a trailing 'Z'."""
    # '+00:00' -> 'Z' (slicing is cheaper than replace(tzinfo=None); called ~7 times a job).
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="microseconds")[:-6] + "Z"


def default_worker_name() -> str:
    """Pod name in Kubernetes (HOSTNAME), as upstream; unique enough elsewhere."""
    return os.environ.get("HOSTNAME") or f"worker-{os.getpid()}"


def text(value: Any) -> Any:
    """Bytes from a client without decode_responses as str; anything else unchanged."""
    return value.decode() if isinstance(value, bytes) else value
