"""The ConsumerPool spec as frozen dataclasses, defaulted from the CRD's own schema.

The API server validates and defaults a pool with the CRD's schema (kiosk_operator.crd);
``parse_spec`` applies the same schema defaults again, so that local mode (a YAML file,
no API server) behaves identically, and the dataclasses take their defaults from it too:
the CRD is the one place a default is written. It then checks the spec, including what
a schema cannot express; each error is one line naming the field.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from kiosk_operator import crd
from kiosk_operator.specfields import (  # noqa: F401 (SpecError is part of this module's API)
    SpecError,
    _bool,
    _int,
    _list,
    _num,
    _obj,
    _optional_num,
    _port,
    _signed_int,
    _str,
)

QUEUE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
BUCKET_RE = re.compile(r"^(gs|s3|file)://")
MODES = ("Deployment", "Job")
PULL_POLICIES = ("Always", "IfNotPresent", "Never")
MAXIMA_ALGORITHMS = ("h_maxima", "peak_local_max")
SPEC_SCHEMA = crd.spec_schema()
#: Pod volumes the operator adds itself (manifests.TMP_VOLUME, manifests.REDIS_TLS_VOLUME).
RESERVED_VOLUMES = frozenset({"tmp", "redis-tls"})


def schema_default(*path: str) -> Any:
    """The CRD's default of ``spec.<path>``, e.g. ``schema_default("redis", "port")``; KeyError if none."""
    node = SPEC_SCHEMA
    for key in path:
        node = node["properties"][key]
    return node["default"]


@dataclass(frozen=True)
class SecretKeyRef:
    name: str
    key: str


@dataclass(frozen=True)
class TLSSecretRef:
    """A Secret with ca.crt (and tls.crt/tls.key when client_certificate): Redis's CA, our client cert."""

    name: str
    client_certificate: bool = schema_default("redis", "tlsSecretRef", "clientCertificate")


@dataclass(frozen=True)
class SentinelSpec:
    hosts: tuple[str, ...]
    master: str = schema_default("redis", "sentinel", "master")


@dataclass(frozen=True)
class RedisSpec:
    host: str = schema_default("redis", "host")
    port: int = schema_default("redis", "port")
    password_secret_ref: SecretKeyRef | None = None
    tls: bool = schema_default("redis", "tls")
    sentinel: SentinelSpec | None = None
    tls_secret_ref: TLSSecretRef | None = None


@dataclass(frozen=True)
class ModelServerDeployment:
    name: str
    replicas: int = schema_default("modelServer", "deployment", "replicas")


@dataclass(frozen=True)
class ModelServerSpec:
    host: str = schema_default("modelServer", "host")
    port: int = schema_default("modelServer", "port")
    deployment: ModelServerDeployment | None = None


@dataclass(frozen=True)
class StorageSpec:
    bucket: str = ""
    credentials_secret_ref: str = ""
    endpoint: str = ""
    public: bool = schema_default("storage", "public")


@dataclass(frozen=True)
class JobSpec:
    ttl_seconds_after_finished: int = schema_default("scaling", "job", "ttlSecondsAfterFinished")
    backoff_limit: int = schema_default("scaling", "job", "backoffLimit")
    active_deadline_seconds: int | None = schema_default("scaling", "job", "activeDeadlineSeconds")
    successful_jobs_history_limit: int = schema_default("scaling", "job", "successfulJobsHistoryLimit")
    failed_jobs_history_limit: int = schema_default("scaling", "job", "failedJobsHistoryLimit")


@dataclass(frozen=True)
class ScalingSpec:
    mode: str = schema_default("scaling", "mode")
    min_workers: int = schema_default("scaling", "minWorkers")
    max_workers: int = schema_default("scaling", "maxWorkers")
    items_per_worker: int = schema_default("scaling", "itemsPerWorker")
    activation_threshold: int = schema_default("scaling", "activationThreshold")
    polling_interval_seconds: float = float(schema_default("scaling", "pollingIntervalSeconds"))
    cooldown_seconds: float = float(schema_default("scaling", "cooldownSeconds"))
    target_drain_seconds: float | None = None
    batch_size: int = schema_default("scaling", "batchSize")
    job: JobSpec = field(default_factory=JobSpec)


@dataclass(frozen=True)
class PostprocessSpec:
    """spec.worker.postprocess: deepcell-toolbox deep_watershed parameters (POSTPROCESS_* in workers)."""

    radius: int = schema_default("worker", "postprocess", "radius")
    maxima_threshold: float = float(schema_default("worker", "postprocess", "maximaThreshold"))
    interior_threshold: float = float(schema_default("worker", "postprocess", "interiorThreshold"))
    maxima_smooth: float = float(schema_default("worker", "postprocess", "maximaSmooth"))
    interior_smooth: float = float(schema_default("worker", "postprocess", "interiorSmooth"))
    maxima_index: int = schema_default("worker", "postprocess", "maximaIndex")
    interior_index: int = schema_default("worker", "postprocess", "interiorIndex")
    label_erosion: int = schema_default("worker", "postprocess", "labelErosion")
    small_objects_threshold: int = schema_default("worker", "postprocess", "smallObjectsThreshold")
    fill_holes_threshold: int = schema_default("worker", "postprocess", "fillHolesThreshold")
    pixel_expansion: int = schema_default("worker", "postprocess", "pixelExpansion")
    maxima_algorithm: str = schema_default("worker", "postprocess", "maximaAlgorithm")
    exclude_border: bool = schema_default("worker", "postprocess", "excludeBorder")


@dataclass(frozen=True)
class WorkerSpec:
    image: str
    image_pull_policy: str = schema_default("worker", "imagePullPolicy")
    command: tuple[str, ...] = ()
    args: tuple[str, ...] = ()
    env: tuple[Mapping[str, Any], ...] = ()
    env_from: tuple[Mapping[str, Any], ...] = ()
    resources: Mapping[str, Any] = field(default_factory=dict)
    node_selector: Mapping[str, str] = field(default_factory=dict)
    tolerations: tuple[Mapping[str, Any], ...] = ()
    affinity: Mapping[str, Any] = field(default_factory=dict)
    service_account_name: str = ""
    termination_grace_period_seconds: int = schema_default("worker", "terminationGracePeriodSeconds")
    grace_seconds: float = float(schema_default("worker", "graceSeconds"))
    heartbeat_interval_seconds: float = float(schema_default("worker", "heartbeatIntervalSeconds"))
    metrics_port: int = schema_default("worker", "metricsPort")
    pod_labels: Mapping[str, str] = field(default_factory=dict)
    pod_annotations: Mapping[str, str] = field(default_factory=dict)
    postprocess: PostprocessSpec = field(default_factory=PostprocessSpec)
    security_context: Mapping[str, Any] = field(default_factory=dict)
    pod_security_context: Mapping[str, Any] = field(default_factory=dict)
    priority_class_name: str = ""
    topology_spread_constraints: tuple[Mapping[str, Any], ...] = ()
    volumes: tuple[Mapping[str, Any], ...] = ()
    volume_mounts: tuple[Mapping[str, Any], ...] = ()
    image_pull_secrets: tuple[str, ...] = ()


@dataclass(frozen=True)
class ReclaimSpec:
    enabled: bool = schema_default("reclaim", "enabled")
    legacy_processing_lists: bool = schema_default("reclaim", "legacyProcessingLists")


@dataclass(frozen=True)
class PoolSpec:
    queues: tuple[str, ...]
    worker: WorkerSpec
    consumer_type: str = schema_default("consumerType")
    redis: RedisSpec = field(default_factory=RedisSpec)
    model_server: ModelServerSpec = field(default_factory=ModelServerSpec)
    storage: StorageSpec = field(default_factory=StorageSpec)
    scaling: ScalingSpec = field(default_factory=ScalingSpec)
    reclaim: ReclaimSpec = field(default_factory=ReclaimSpec)


# --- parsing helpers ------------------------------------------------------------------------
# parse_spec has applied the schema's defaults first: a field the CRD defaults is present here.


# --- sections -------------------------------------------------------------------------------
# An empty string where the CRD has a default means the default (the API server rejects it).


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
    return TLSSecretRef(name, _bool(data, "clientCertificate", path))


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
        master = _str(s, "master", p + ".sentinel") or schema_default("redis", "sentinel", "master")
        sentinel = SentinelSpec(hosts, master)
    tls = _bool(data, "tls", p)
    return RedisSpec(
        host=_str(data, "host", p) or schema_default("redis", "host"),
        port=_port(data, "port", p),
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
        dep = ModelServerDeployment(name, _int(d, "replicas", p + ".deployment", minimum=1))
    return ModelServerSpec(
        host=_str(data, "host", p) or schema_default("modelServer", "host"),
        port=_port(data, "port", p),
        deployment=dep,
    )


def _storage(data: Mapping[str, Any]) -> StorageSpec:
    p = "spec.storage"
    bucket = _str(data, "bucket", p)
    if bucket and not BUCKET_RE.match(bucket):
        raise SpecError(f"{p}.bucket: must start with gs://, s3:// or file://, not {bucket!r}")
    creds = data.get("credentialsSecretRef")
    creds_name = _str(_obj(creds, p + ".credentialsSecretRef"), "name", p + ".credentialsSecretRef")
    return StorageSpec(bucket, creds_name, _str(data, "endpoint", p), _bool(data, "public", p))


def _scaling(data: Mapping[str, Any]) -> ScalingSpec:
    p = "spec.scaling"
    mode = _str(data, "mode", p)
    if mode not in MODES:
        raise SpecError(f"{p}.mode: must be one of {', '.join(MODES)}, not {mode!r}")
    j = _obj(data.get("job"), p + ".job")
    pj = p + ".job"
    job = JobSpec(
        ttl_seconds_after_finished=_int(j, "ttlSecondsAfterFinished", pj),
        backoff_limit=_int(j, "backoffLimit", pj),
        active_deadline_seconds=_int(j, "activeDeadlineSeconds", pj, minimum=1),
        successful_jobs_history_limit=_int(j, "successfulJobsHistoryLimit", pj),
        failed_jobs_history_limit=_int(j, "failedJobsHistoryLimit", pj),
    )
    spec = ScalingSpec(
        mode=mode,
        min_workers=_int(data, "minWorkers", p),
        max_workers=_int(data, "maxWorkers", p),
        items_per_worker=_int(data, "itemsPerWorker", p, minimum=1),
        activation_threshold=_int(data, "activationThreshold", p, minimum=1),
        polling_interval_seconds=_num(data, "pollingIntervalSeconds", p, 0.1),
        cooldown_seconds=_num(data, "cooldownSeconds", p, 0.0),
        target_drain_seconds=_optional_num(data, "targetDrainSeconds", p, 0.0, exclusive=True),
        batch_size=_int(data, "batchSize", p, minimum=1),
        job=job,
    )
    if spec.min_workers > spec.max_workers:
        raise SpecError(
            f"{p}.minWorkers ({spec.min_workers}) must be less than or equal to "
            f"{p}.maxWorkers ({spec.max_workers})"
        )
    return spec


def _postprocess(data: Mapping[str, Any]) -> PostprocessSpec:
    p = "spec.worker.postprocess"
    algorithm = _str(data, "maximaAlgorithm", p)
    if algorithm not in MAXIMA_ALGORITHMS:
        raise SpecError(f"{p}.maximaAlgorithm: must be one of {', '.join(MAXIMA_ALGORITHMS)}, not {algorithm!r}")
    return PostprocessSpec(
        radius=_int(data, "radius", p, minimum=1),
        maxima_threshold=_num(data, "maximaThreshold", p, 0.0),
        interior_threshold=_num(data, "interiorThreshold", p, float("-inf")),
        maxima_smooth=_num(data, "maximaSmooth", p, 0.0),
        interior_smooth=_num(data, "interiorSmooth", p, 0.0),
        maxima_index=_signed_int(data, "maximaIndex", p),
        interior_index=_signed_int(data, "interiorIndex", p),
        label_erosion=_int(data, "labelErosion", p),
        small_objects_threshold=_int(data, "smallObjectsThreshold", p),
        fill_holes_threshold=_int(data, "fillHolesThreshold", p),
        pixel_expansion=_int(data, "pixelExpansion", p),
        maxima_algorithm=algorithm,
        exclude_border=_bool(data, "excludeBorder", p),
    )


def _worker(data: Mapping[str, Any]) -> WorkerSpec:
    p = "spec.worker"
    image = _str(data, "image", p)
    if not image.strip():
        raise SpecError(f"{p}.image: is required")
    policy = _str(data, "imagePullPolicy", p)
    if policy not in PULL_POLICIES:
        raise SpecError(f"{p}.imagePullPolicy: must be one of {', '.join(PULL_POLICIES)}, not {policy!r}")
    env = _list(data, "env", p)
    for i, item in enumerate(env):
        if not isinstance(item, Mapping) or not item.get("name"):
            raise SpecError(f"{p}.env[{i}]: needs a name")
    tgps = _int(data, "terminationGracePeriodSeconds", p, minimum=1)
    grace = _num(data, "graceSeconds", p, 0.0)
    if grace >= tgps:
        raise SpecError(
            f"{p}.graceSeconds ({grace:g}) must be less than {p}.terminationGracePeriodSeconds ({tgps}), "
            "or Kubernetes kills the worker before it can put its item back"
        )
    volumes, mounts = _list(data, "volumes", p), _list(data, "volumeMounts", p)
    _named(volumes, p + ".volumes")
    _named(mounts, p + ".volumeMounts")
    names = {v["name"] for v in volumes}
    for reserved in RESERVED_VOLUMES & names:
        raise SpecError(f"{p}.volumes: the name {reserved!r} is the operator's own")
    for i, m in enumerate(mounts):
        if m["name"] not in names:
            raise SpecError(f"{p}.volumeMounts[{i}].name: {m['name']!r} is not in spec.worker.volumes")
        if not m.get("mountPath"):
            raise SpecError(f"{p}.volumeMounts[{i}].mountPath: is required")
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
        heartbeat_interval_seconds=_num(data, "heartbeatIntervalSeconds", p, 0.0, exclusive=True),
        # 0 (off) or a port number.
        metrics_port=_int(data, "metricsPort", p) and _port(data, "metricsPort", p),
        pod_labels={str(k): str(v) for k, v in _obj(data.get("podLabels"), p + ".podLabels").items()},
        pod_annotations={
            str(k): str(v) for k, v in _obj(data.get("podAnnotations"), p + ".podAnnotations").items()
        },
        postprocess=_postprocess(_obj(data.get("postprocess"), p + ".postprocess")),
        security_context=dict(_obj(data.get("securityContext"), p + ".securityContext")),
        pod_security_context=dict(_obj(data.get("podSecurityContext"), p + ".podSecurityContext")),
        priority_class_name=_str(data, "priorityClassName", p),
        topology_spread_constraints=_list(data, "topologySpreadConstraints", p),
        volumes=volumes,
        volume_mounts=mounts,
        image_pull_secrets=tuple(_pull_secret(s, i) for i, s in enumerate(_list(data, "imagePullSecrets", p))),
    )


def _pull_secret(item: Any, i: int) -> str:
    name = item.get("name") if isinstance(item, Mapping) else None
    if not isinstance(name, str) or not name:
        raise SpecError(f"spec.worker.imagePullSecrets[{i}].name: is required")
    return name


def _named(items: tuple[Any, ...], path: str) -> None:
    for i, item in enumerate(items):
        if not isinstance(item, Mapping) or not item.get("name"):
            raise SpecError(f"{path}[{i}].name: is required")


def _reclaim(data: Mapping[str, Any]) -> ReclaimSpec:
    p = "spec.reclaim"
    return ReclaimSpec(_bool(data, "enabled", p), _bool(data, "legacyProcessingLists", p))


def parse_spec(data: Mapping[str, Any] | None) -> PoolSpec:
    """Default (from the CRD's schema) and parse a ConsumerPool ``spec``; SpecError (one line) when unusable.

    ``data`` itself is not modified.
    """
    data = crd.apply_defaults(_obj(data, "spec"), SPEC_SCHEMA)
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
    return PoolSpec(
        queues=queues,
        worker=_worker(_obj(data["worker"], "spec.worker")),
        consumer_type=_str(data, "consumerType", "spec") or schema_default("consumerType"),
        redis=_redis(_obj(data.get("redis"), "spec.redis")),
        model_server=_model_server(_obj(data.get("modelServer"), "spec.modelServer")),
        storage=_storage(_obj(data.get("storage"), "spec.storage")),
        scaling=_scaling(_obj(data.get("scaling"), "spec.scaling")),
        reclaim=_reclaim(_obj(data.get("reclaim"), "spec.reclaim")),
    )
