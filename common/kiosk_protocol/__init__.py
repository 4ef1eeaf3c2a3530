"""The Kiosk wire protocol, shared by the worker, the operator and the CLI.

Everything that names a Redis key, a hash field, a status, a Lua script, the worker registry
and its liveness rule, or the ConsumerPool's API coordinates lives in this package, so that
the Kiosk wire format is written down exactly once. ``import kiosk_protocol as protocol``
gives the common names; the submodules hold the rest.


Submodules are imported on first use, so a part that needs only ``errors`` or ``keys``
(the TF Serving client, say) does not pay for importing redis.
"""

from __future__ import annotations

import importlib
from typing import Any

#: Public name -> the submodule that defines it.
_EXPORTS: dict[str, str] = {
    "printable": "errors",
    "dead_letter_key": "keys",
    "dead_letter_foreign": "jobs",
    "FieldTooLarge": "jobs",
    "NotAJobHash": "jobs",
    "DONE": "fields",
    "FAILED": "fields",
    "FINISHED_STATUSES": "fields",
    "NEW": "fields",
    "POST_PROCESSING": "fields",
    "PREDICTING": "fields",
    "PRE_PROCESSING": "fields",
    "SAVING_RESULTS": "fields",
    "STARTED": "fields",
    "SUBMISSION_FIELDS": "fields",
    "WAITING": "fields",
    "JobStore": "jobs",
    "push_once": "jobs",
    "submission_fields": "jobs",
    "submit_job": "jobs",
    "PROCESSING_PREFIX": "keys",
    "WORKERS_PREFIX": "keys",
    "WORKER_INFO_PREFIX": "keys",
    "ZIP_SUFFIX": "keys",
    "default_worker_name": "keys",
    "job_key": "keys",
    "metadata_key": "keys",
    "parse_processing_key": "keys",
    "processing_key": "keys",
    "queue_for_file": "keys",
    "queue_of_key": "keys",
    "text": "keys",
    "utc_now_iso": "keys",
    "worker_info_key": "keys",
    "workers_key": "keys",
    "QueueDepth": "registry",
    "RECLAIM_DROPPED": "registry",
    "RECLAIM_REQUEUED": "registry",
    "RECLAIM_TAKEN_ELSEWHERE": "registry",
    "WorkerState": "registry",
    "forget_worker": "registry",
    "heartbeat_ttl": "registry",
    "measure_depth": "registry",
    "reclaim_list": "registry",
}

__all__ = sorted(_EXPORTS)



def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        try:
            return importlib.import_module(f"{__name__}.{name}")  # a submodule: kiosk_protocol.zipjobs
        except ModuleNotFoundError:
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
