"""The Kiosk wire protocol, shared by the worker, the operator and the CLI.

Everything that names a Redis key, a hash field, a status, a Lua script, the worker registry
and its liveness rule, or the ConsumerPool's API coordinates lives in this package, so that
the Kiosk wire format is written down exactly once. ``import kiosk_protocol as protocol``
gives the common names; the submodules hold the rest.
"""

from kiosk_protocol.fields import (
    DONE,
    FAILED,
    FINISHED_STATUSES,
    NEW,
    POST_PROCESSING,
    PRE_PROCESSING,
    PREDICTING,
    SAVING_RESULTS,
    STARTED,
    SUBMISSION_FIELDS,
    WAITING,
)
from kiosk_protocol.jobs import JobStore, push_once, submission_fields, submit_job
from kiosk_protocol.keys import (
    PROCESSING_PREFIX,
    WORKER_INFO_PREFIX,
    WORKERS_PREFIX,
    ZIP_SUFFIX,
    default_worker_name,
    job_key,
    metadata_key,
    parse_processing_key,
    processing_key,
    queue_for_file,
    queue_of_key,
    text,
    utc_now_iso,
    worker_info_key,
    workers_key,
)
from kiosk_protocol.registry import (
    RECLAIM_DROPPED,
    RECLAIM_REQUEUED,
    RECLAIM_TAKEN_ELSEWHERE,
    QueueDepth,
    WorkerState,
    forget_worker,
    heartbeat_ttl,
    measure_depth,
    reclaim_list,
)

__all__ = [
    "DONE",
    "FAILED",
    "FINISHED_STATUSES",
    "NEW",
    "POST_PROCESSING",
    "PREDICTING",
    "PRE_PROCESSING",
    "PROCESSING_PREFIX",
    "RECLAIM_DROPPED",
    "RECLAIM_REQUEUED",
    "RECLAIM_TAKEN_ELSEWHERE",
    "SAVING_RESULTS",
    "STARTED",
    "SUBMISSION_FIELDS",
    "WAITING",
    "WORKERS_PREFIX",
    "WORKER_INFO_PREFIX",
    "ZIP_SUFFIX",
    "JobStore",
    "QueueDepth",
    "WorkerState",
    "default_worker_name",
    "forget_worker",
    "heartbeat_ttl",
    "job_key",
    "measure_depth",
    "metadata_key",
    "parse_processing_key",
    "processing_key",
    "push_once",
    "queue_for_file",
    "queue_of_key",
    "reclaim_list",
    "submission_fields",
    "submit_job",
    "text",
    "utc_now_iso",
    "worker_info_key",
    "workers_key",
]
