"""Statuses and hash fields of Kiosk jobs, as the Kiosk frontend and consumers write them."""

from __future__ import annotations

# --- statuses -------------------------------------------------------------------------------

NEW = "new"
STARTED = "started"
PRE_PROCESSING = "pre-processing"
PREDICTING = "predicting"
POST_PROCESSING = "post-processing"
SAVING_RESULTS = "saving-results"
WAITING = "waiting"
DONE = "done"
FAILED = "failed"
FINISHED_STATUSES = frozenset({DONE, FAILED})

#: Fields the Kiosk frontend writes at submission; unset ones are ''. A zip child copies
#: these, and only these, from its parent.
SUBMISSION_FIELDS: tuple[str, ...] = (
    "original_name",
    "input_file_name",
    "model_name",
    "model_version",
    "postprocess_function",
    "preprocess_function",
    "cuts",
    "url",
    "label",
    "status",
    "created_at",
    "updated_at",
    "identity_upload",
    "dimension_order",
    "channels",
    "scale",
    "segmentation_type",
)

# Fields every consumer write stamps.
UPDATED_AT = "updated_at"
UPDATED_BY = "updated_by"
IDENTITY_STARTED = "identity_started"
STATUS = "status"
REASON = "reason"
# Written with every final status unless the consumer set them (seconds as strings).
FINISHED_AT = "finished_at"
TOTAL_TIME = "total_time"

# --- zip parents (the zip consumer's own fields on the parent hash) --------------------------

CHILDREN = "children"
CHILDREN_DONE = "children:done"
CHILDREN_FAILED = "children:failed"
PROGRESS = "progress"
FAILURES = "failures"
TOTAL_JOBS = "total_jobs"

#: The zip consumer's own parent fields (lists of child keys): their size is bounded by
#: MAX_ZIP_MEMBERS, not by MAX_FIELD_BYTES.
ZIP_PARENT_FIELDS: frozenset[str] = frozenset({CHILDREN, CHILDREN_DONE, CHILDREN_FAILED, FAILURES})

# --- field size ------------------------------------------------------------------------------

#: Default of MAX_FIELD_BYTES: a job with a longer field (other than ZIP_PARENT_FIELDS) fails
#: before any work. Job fields come from a public web form; a zip fans them out to every child.
MAX_FIELD_BYTES = 8192
#: Default of MAX_ATTEMPTS: takes of one job before it fails as a poison pill.
MAX_ATTEMPTS = 3

# --- worker heartbeat hash (kiosk:worker:{name}) ---------------------------------------------

HB_HEARTBEAT = "heartbeat"
HB_QUEUES = "queues"
HB_CURRENT = "current"
HB_STATE = "state"
HB_CONSUMER_TYPE = "consumer_type"
HB_JOBS_DONE = "jobs_done"
HB_JOBS_FAILED = "jobs_failed"
HB_SERVICE_EWMA = "service_time_ewma"
HB_SERVICE_SAMPLES = "service_time_samples"
HB_STARTED_AT = "started_at"

# Worker states reported in HB_STATE.
STATE_IDLE = "idle"
STATE_BUSY = "busy"
STATE_DRAINING = "draining"
