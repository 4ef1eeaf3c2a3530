"""The ConsumerPool spec as frozen dataclasses, with the CRD's defaults.

The API server already validates and defaults the CR (crds/consumerpool.yaml); this
module applies the same defaults again so that local mode (a YAML file, no API
server) behaves identically, and checks the few things a schema cannot: each
error is one line naming the field.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

QUEUE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
BUCKET_RE = re.compile(r"^(gs|s3|file)://")
MODES = ("Deployment", "Job")
PULL_POLICIES = ("Always", "IfNotPresent", "Never")


class SpecError(ValueError):
    """The pool spec cannot be used; the message is one line naming the field."""


@dataclass(frozen=True)
class SecretKeyRef:
    name: str
    key: str


@dataclass(frozen=True)
class TLSSecretRef:
    """A Secret with ca.crt (and tls.crt/tls.key when client_certificate): Redis's CA, our client cert."""

    name: str
    client_certificate: bool = False


@dataclass(frozen=True)
class SentinelSpec:
    hosts: tuple[str, ...]
    master: str = "mymaster"


@dataclass(frozen=True)
class RedisSpec:
    host: str = "redis-master"
    port: int = 6379
    password_secret_ref: SecretKeyRef | None = None
    tls: bool = False
    sentinel: SentinelSpec | None = None
    tls_secret_ref: TLSSecretRef | None = None


@dataclass(frozen=True)
class ModelServerDeployment:
    name: str
    replicas: int = 1


@dataclass(frozen=True)
class ModelServerSpec:
    host: str = "tf-serving"
    port: int = 8500
    deployment: ModelServerDeployment | None = None


@dataclass(frozen=True)
class StorageSpec:
    bucket: str = ""
    credentials_secret_ref: str = ""
    endpoint: str = ""
    public: bool = False


@dataclass(frozen=True)
class JobSpec:
    ttl_seconds_after_finished: int = 300
    backoff_limit: int = 0
    active_deadline_seconds: int | None = 3600
    successful_jobs_history_limit: int = 3
    failed_jobs_history_limit: int = 1


@dataclass(frozen=True)
class ScalingSpec:
    mode: str = "Deployment"
    min_workers: int = 0
    max_workers: int = 1
    items_per_worker: int = 1
    activation_threshold: int = 1
    polling_interval_seconds: float = 1.0
    cooldown_seconds: float = 60.0
    target_drain_seconds: float | None = None
    batch_size: int = 10
    job: JobSpec = field(default_factory=JobSpec)


@dataclass(frozen=True)
class WorkerSpec:
    image: str
    image_pull_policy: str = "IfNotPresent"
    command: tuple[str, ...] = ()
    args: tuple[str, ...] = ()
    env: tuple[Mapping[str, Any], ...] = ()
    env_from: tuple[Mapping[str, Any], ...] = ()
    resources: Mapping[str, Any] = field(default_factory=dict)
    node_selector: Mapping[str, str] = field(default_factory=dict)
    tolerations: tuple[Mapping[str, Any], ...] = ()
    affinity: Mapping[str, Any] = field(default_factory=dict)
    service_account_name: str = ""
    termination_grace_period_seconds: int = 30
    grace_seconds: float = 25.0
    heartbeat_interval_seconds: float = 2.0
    pod_labels: Mapping[str, str] = field(default_factory=dict)
    pod_annotations: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class ReclaimSpec:
    enabled: bool = True
    legacy_processing_lists: bool = False


@dataclass(frozen=True)
class PoolSpec:
    queues: tuple[str, ...]
    worker: WorkerSpec
    consumer_type: str = "segmentation"
    redis: RedisSpec = field(default_factory=RedisSpec)
    model_server: ModelServerSpec = field(default_factory=ModelServerSpec)
    storage: StorageSpec = field(default_factory=StorageSpec)
    scaling: ScalingSpec = field(default_factory=ScalingSpec)
    reclaim: ReclaimSpec = field(default_factory=ReclaimSpec)


# --- parsing helpers ------------------------------------------------------------------------


def _obj(data: Any, path: str) -> Mapping[str, Any]:
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise SpecError(f"{path}: must be an object")
    return data


def _int(data: Mapping[str, Any], key: str, path: str, default: int, minimum: int = 0) -> int:
    value = data.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise SpecError(f"{path}.{key}: must be an integer, not {value!r}")
    if value < minimum:
        raise SpecError(f"{path}.{key}: must be at least {minimum}, not {value}")
    return value


def _num(
    data: Mapping[str, Any],
    key: str,
    path: str,
    default: float | None,
    minimum: float = 0.0,
    exclusive: bool = False,
) -> float | None:
    value = data.get(key, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise SpecError(f"{path}.{key}: must be a number, not {value!r}")
    if value < minimum or (exclusive and value == minimum):
        word = "greater than" if exclusive else "at least"
        raise SpecError(f"{path}.{key}: must be {word} {minimum}, not {value}")
    return float(value)


def _str(data: Mapping[str, Any], key: str, path: str, default: str = "") -> str:
    value = data.get(key, default)
    if value is None:
        return default
    if not isinstance(value, str):
        raise SpecError(f"{path}.{key}: must be a string, not {value!r}")
    return value


def _bool(data: Mapping[str, Any], key: str, path: str, default: bool) -> bool:
    value = data.get(key, default)
    if not isinstance(value, bool):
        raise SpecError(f"{path}.{key}: must be true or false, not {value!r}")
    return value


def _list(data: Mapping[str, Any], key: str, path: str) -> tuple[Any, ...]:
    value = data.get(key) or ()
    if not isinstance(value, list | tuple):
        raise SpecError(f"{path}.{key}: must be a list")
    return tuple(value)


def _port(data: Mapping[str, Any], key: str, path: str, default: int) -> int:
    value = _int(data, key, path, default, minimum=1)
    if value > 65535:
        raise SpecError(f"{path}.{key}: must be a port number between 1 and 65535, not {value}")
    return value


# --- sections -------------------------------------------------------------------------------


def _secret_key_ref(data: Any, path: str) -> SecretKeyRef | None:
    if data is None:
        return None
    data = _obj(data, path)
    name, key = _str(data, "name", path), _str(data, "key", path)
    if not name or not key:
        raise SpecError(f"{path}: needs both name and key")
    return SecretKeyRef(name, key)


def _tls_secret_ref(data: Any, path: str, tls: bool) -> TLSSecretRef | None:
    if data is None:
        return None
    data = _obj(data, path)
    name = _str(data, "name", path).strip()
    if not name:
        raise SpecError(f"{path}.name: is required")
    if not tls:
        raise SpecError(f"{path}: needs spec.redis.tls set to true")
    return TLSSecretRef(name, _bool(data, "clientCertificate", path, False))


def _redis(data: Mapping[str, Any]) -> RedisSpec:
    p = "spec.redis"
    sentinel = None
    if data.get("sentinel") is not None:
        s = _obj(data["sentinel"], p + ".sentinel")
        hosts = tuple(str(h) for h in _list(s, "hosts", p + ".sentinel"))
        if not hosts:
            raise SpecError(f"{p}.sentinel.hosts: needs at least one host:port")
        for host in hosts:
            if not re.fullmatch(r"[^:\s]+:\d{1,5}", host) or not 0 < int(host.rsplit(":", 1)[1]) < 65536:
                raise SpecError(f"{p}.sentinel.hosts: {host!r} is not host:port (port 1-65535)")
        sentinel = SentinelSpec(hosts, _str(s, "master", p + ".sentinel", "mymaster") or "mymaster")
    tls = _bool(data, "tls", p, False)
    return RedisSpec(
        host=_str(data, "host", p, "redis-master") or "redis-master",
        port=_port(data, "port", p, 6379),
        password_secret_ref=_secret_key_ref(data.get("passwordSecretRef"), p + ".passwordSecretRef"),
        tls=tls,
        sentinel=sentinel,
        tls_secret_ref=_tls_secret_ref(data.get("tlsSecretRef"), p + ".tlsSecretRef", tls),
    )


def _model_server(data: Mapping[str, Any]) -> ModelServerSpec:
    p = "spec.modelServer"
    dep = None
    if data.get("deployment") is not None:
        d = _obj(data["deployment"], p + ".deployment")
        name = _str(d, "name", p + ".deployment")
        if not name:
            raise SpecError(f"{p}.deployment.name: is required")
        dep = ModelServerDeployment(name, _int(d, "replicas", p + ".deployment", 1, minimum=1))
    return ModelServerSpec(
        host=_str(data, "host", p, "tf-serving") or "tf-serving",
        port=_port(data, "port", p, 8500),
        deployment=dep,
    )


def _storage(data: Mapping[str, Any]) -> StorageSpec:
    p = "spec.storage"
    bucket = _str(data, "bucket", p)
    if bucket and not BUCKET_RE.match(bucket):
        raise SpecError(f"{p}.bucket: must start with gs://, s3:// or file://, not {bucket!r}")
    creds = data.get("credentialsSecretRef")
    creds_name = _str(_obj(creds, p + ".credentialsSecretRef"), "name", p + ".credentialsSecretRef")
    return StorageSpec(bucket, creds_name, _str(data, "endpoint", p), _bool(data, "public", p, False))


def _scaling(data: Mapping[str, Any]) -> ScalingSpec:
    p = "spec.scaling"
    mode = _str(data, "mode", p, "Deployment")
    if mode not in MODES:
        raise SpecError(f"{p}.mode: must be one of {', '.join(MODES)}, not {mode!r}")
    j = _obj(data.get("job"), p + ".job")
    pj = p + ".job"
    deadline = j.get("activeDeadlineSeconds", 3600)
    job = JobSpec(
        ttl_seconds_after_finished=_int(j, "ttlSecondsAfterFinished", pj, 300),
        backoff_limit=_int(j, "backoffLimit", pj, 0),
        active_deadline_seconds=None if deadline is None else _int(j, "activeDeadlineSeconds", pj, 3600, 1),
        successful_jobs_history_limit=_int(j, "successfulJobsHistoryLimit", pj, 3),
        failed_jobs_history_limit=_int(j, "failedJobsHistoryLimit", pj, 1),
    )
    spec = ScalingSpec(
        mode=mode,
        min_workers=_int(data, "minWorkers", p, 0),
        max_workers=_int(data, "maxWorkers", p, 1),
        items_per_worker=_int(data, "itemsPerWorker", p, 1, minimum=1),
        activation_threshold=_int(data, "activationThreshold", p, 1, minimum=1),
        polling_interval_seconds=_num(data, "pollingIntervalSeconds", p, 1.0, 0.1),  # type: ignore[arg-type]
        cooldown_seconds=_num(data, "cooldownSeconds", p, 60.0, 0.0),  # type: ignore[arg-type]
        target_drain_seconds=_num(data, "targetDrainSeconds", p, None, 0.0, exclusive=True),
        batch_size=_int(data, "batchSize", p, 10, minimum=1),
        job=job,
    )
    if spec.min_workers > spec.max_workers:
        raise SpecError(
            f"{p}.minWorkers ({spec.min_workers}) must be less than or equal to "
            f"{p}.maxWorkers ({spec.max_workers})"
        )
    return spec


def _worker(data: Mapping[str, Any]) -> WorkerSpec:
    p = "spec.worker"
    image = _str(data, "image", p)
    if not image.strip():
        raise SpecError(f"{p}.image: is required")
    policy = _str(data, "imagePullPolicy", p, "IfNotPresent")
    if policy not in PULL_POLICIES:
        raise SpecError(f"{p}.imagePullPolicy: must be one of {', '.join(PULL_POLICIES)}, not {policy!r}")
    env = _list(data, "env", p)
    for i, item in enumerate(env):
        if not isinstance(item, Mapping) or not item.get("name"):
            raise SpecError(f"{p}.env[{i}]: needs a name")
    tgps = _int(data, "terminationGracePeriodSeconds", p, 30, minimum=1)
    grace = _num(data, "graceSeconds", p, 25.0, 0.0)
    assert grace is not None
    if grace >= tgps:
        raise SpecError(
            f"{p}.graceSeconds ({grace:g}) must be less than {p}.terminationGracePeriodSeconds ({tgps}), "
            "or Kubernetes kills the worker before it can put its item back"
        )
    return WorkerSpec(
        image=image.strip(),
        image_pull_policy=policy,
        command=tuple(str(c) for c in _list(data, "command", p)),
        args=tuple(str(a) for a in _list(data, "args", p)),
        env=env,
        env_from=_list(data, "envFrom", p),
        resources=dict(_obj(data.get("resources"), p + ".resources")),
        node_selector={
            str(k): str(v) for k, v in _obj(data.get("nodeSelector"), p + ".nodeSelector").items()
        },
        tolerations=_list(data, "tolerations", p),
        affinity=dict(_obj(data.get("affinity"), p + ".affinity")),
        service_account_name=_str(data, "serviceAccountName", p),
        termination_grace_period_seconds=tgps,
        grace_seconds=grace,
        heartbeat_interval_seconds=_num(data, "heartbeatIntervalSeconds", p, 2.0, 0.0, exclusive=True),  # type: ignore[arg-type]
        pod_labels={str(k): str(v) for k, v in _obj(data.get("podLabels"), p + ".podLabels").items()},
        pod_annotations={
            str(k): str(v) for k, v in _obj(data.get("podAnnotations"), p + ".podAnnotations").items()
        },
    )


def parse_spec(data: Mapping[str, Any] | None) -> PoolSpec:
    """Parse and default a ConsumerPool ``spec``; raises SpecError (one line) when unusable."""
    data = _obj(data, "spec")
    queues = tuple(str(q) for q in _list(data, "queues", "spec"))
    if not queues:
        raise SpecError("spec.queues: needs at least one queue name")
    for queue in queues:
        if not QUEUE_RE.match(queue):
            raise SpecError(f"spec.queues: {queue!r} is not a valid queue name (letters, digits, _ . -)")
    if len(set(queues)) != len(queues):
        raise SpecError("spec.queues: queue names must be unique")
    if "worker" not in data:
        raise SpecError("spec.worker: is required (at least worker.image)")
    consumer = _str(data, "consumerType", "spec", "segmentation") or "segmentation"
    return PoolSpec(
        queues=queues,
        worker=_worker(_obj(data["worker"], "spec.worker")),
        consumer_type=consumer,
        redis=_redis(_obj(data.get("redis"), "spec.redis")),
        model_server=_model_server(_obj(data.get("modelServer"), "spec.modelServer")),
        storage=_storage(_obj(data.get("storage"), "spec.storage")),
        scaling=_scaling(_obj(data.get("scaling"), "spec.scaling")),
        reclaim=ReclaimSpec(
            enabled=_bool(_obj(data.get("reclaim"), "spec.reclaim"), "enabled", "spec.reclaim", True),
            legacy_processing_lists=_bool(
                _obj(data.get("reclaim"), "spec.reclaim"), "legacyProcessingLists", "spec.reclaim", False
            ),
        ),
    )
