"""Pure builders of the Kubernetes objects a pool owns (dicts, ready to send).

Settings flow from the pool into the worker's environment variables (the names of
kiosk_protocol.settings); secrets are passed by reference only, never by value.
Ownership (ownerReferences) is added by the caller with ``kopf.adopt``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from kiosk_operator.spec import PoolSpec, PostprocessSpec, TLSSecretRef
from kiosk_protocol.crd import GROUP

POOL_LABEL = f"{GROUP}/pool"
COMPONENT_LABEL = "app.kubernetes.io/component"
DELETION_COST_ANNOTATION = "controller.kubernetes.io/pod-deletion-cost"
WORKER_CONTAINER = "worker"
WORKER_COMPONENT = "worker"
JOB_COMPONENT = "job-worker"
WORKER_COMMAND = "kiosk-worker"
#: Where the pool's spec.redis.tlsSecretRef is mounted (read-only) in worker pods.
REDIS_TLS_VOLUME = "redis-tls"
REDIS_TLS_DIR = "/etc/kiosk/redis-tls"
#: Keys of a TLS Secret (kubernetes.io/tls plus ca.crt), as cert-manager writes them.
TLS_CA_KEY, TLS_CERT_KEY, TLS_KEY_KEY = "ca.crt", "tls.crt", "tls.key"
#: The writable scratch directory of worker pods (the root filesystem is read-only).
TMP_VOLUME, TMP_DIR, TMP_SIZE_LIMIT = "tmp", "/tmp", "1Gi"
#: The worker images' user (Dockerfile.worker): worker pods run as it by default.
WORKER_UID = 10001
#: Ephemeral storage of a worker container unless spec.worker.resources sets it.
EPHEMERAL_REQUEST, EPHEMERAL_LIMIT = "256Mi", "2Gi"
#: The worker container's Prometheus port (spec.worker.metricsPort); the chart's PodMonitor scrapes it by name.
METRICS_PORT_NAME = "metrics"


def pool_labels(pool_name: str, component: str = WORKER_COMPONENT) -> dict[str, str]:
    """Labels on every object of a pool; the first two also select its pods."""
    return {
        POOL_LABEL: pool_name,
        COMPONENT_LABEL: component,
        "app.kubernetes.io/name": "kiosk-worker",
        "app.kubernetes.io/instance": pool_name,
        "app.kubernetes.io/managed-by": "kiosk-operator",
    }


def selector_labels(pool_name: str, component: str = WORKER_COMPONENT) -> dict[str, str]:
    return {POOL_LABEL: pool_name, COMPONENT_LABEL: component}


def label_selector(pool_name: str, component: str = WORKER_COMPONENT) -> str:
    """The same selector as a string for list calls."""
    return ",".join(f"{k}={v}" for k, v in selector_labels(pool_name, component).items())


def deployment_name(pool_name: str) -> str:
    return f"{pool_name}-worker"


def job_name(pool_name: str, index: int | str) -> str:
    return f"{pool_name}-job-{index}"


def _value(name: str, value: Any) -> dict[str, Any]:
    return {"name": name, "value": str(value)}


def _bool(value: bool) -> str:
    return "true" if value else "false"


def tls_secret_keys(ref: TLSSecretRef) -> tuple[str, ...]:
    """The Secret keys a pool uses: only ca.crt unless it presents a client certificate."""
    return (TLS_CA_KEY, TLS_CERT_KEY, TLS_KEY_KEY) if ref.client_certificate else (TLS_CA_KEY,)


def redis_tls_file_env(ref: TLSSecretRef) -> dict[str, str]:
    """REDIS_TLS_*_FILE variables pointing at the mounted Secret's files."""
    names = {TLS_CA_KEY: "REDIS_TLS_CA_FILE", TLS_CERT_KEY: "REDIS_TLS_CERT_FILE", TLS_KEY_KEY: "REDIS_TLS_KEY_FILE"}
    return {names[key]: f"{REDIS_TLS_DIR}/{key}" for key in tls_secret_keys(ref)}


def build_volumes(spec: PoolSpec) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(pod volumes, container volumeMounts): the TLS Secret, /tmp, then spec.worker.volumes.

    The TLS Secret is read-only with only the keys in use: listing them keeps other keys of
    the Secret (a CA's own tls.key, say) out of the pod.
    """
    volumes: list[dict[str, Any]] = []
    mounts: list[dict[str, Any]] = []
    ref = spec.redis.tls_secret_ref
    if ref is not None:
        items = [{"key": key, "path": key} for key in tls_secret_keys(ref)]
        volumes.append({"name": REDIS_TLS_VOLUME, "secret": {"secretName": ref.name, "items": items}})
        mounts.append({"name": REDIS_TLS_VOLUME, "mountPath": REDIS_TLS_DIR, "readOnly": True})
    volumes.append({"name": TMP_VOLUME, "emptyDir": {"sizeLimit": TMP_SIZE_LIMIT}})
    mounts.append({"name": TMP_VOLUME, "mountPath": TMP_DIR})
    volumes += [dict(v) for v in spec.worker.volumes]
    mounts += [dict(m) for m in spec.worker.volume_mounts]
    return volumes, mounts


def container_security_context(spec: PoolSpec) -> dict[str, Any]:
    """The Pod Security Standard ``restricted`` profile, then spec.worker.securityContext on top."""
    return {
        "runAsNonRoot": True,
        "runAsUser": WORKER_UID,
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
        **spec.worker.security_context,
    }


def pod_security_context(spec: PoolSpec) -> dict[str, Any]:
    return {
        "runAsNonRoot": True,
        "runAsUser": WORKER_UID,
        "runAsGroup": WORKER_UID,
        "fsGroup": WORKER_UID,
        "seccompProfile": {"type": "RuntimeDefault"},
        **spec.worker.pod_security_context,
    }


def container_resources(spec: PoolSpec) -> dict[str, Any]:
    """spec.worker.resources plus ephemeral-storage requests/limits unless set there."""
    res = {k: dict(v) for k, v in spec.worker.resources.items() if isinstance(v, dict)}
    res.setdefault("requests", {}).setdefault("ephemeral-storage", EPHEMERAL_REQUEST)
    res.setdefault("limits", {}).setdefault("ephemeral-storage", EPHEMERAL_LIMIT)
    return res


def postprocess_env(pp: PostprocessSpec) -> dict[str, str]:
    """spec.worker.postprocess as POSTPROCESS_<FIELD> variables (kiosk_protocol.settings)."""
    out = {}
    for f in dataclasses.fields(pp):
        value = getattr(pp, f.name)
        if isinstance(value, bool):
            text = _bool(value)
        elif isinstance(value, float):
            text = repr(value)
        else:
            text = str(value)
        out[f"POSTPROCESS_{f.name.upper()}"] = text
    return out


def build_worker_env(spec: PoolSpec) -> list[dict[str, Any]]:
    """The worker's environment: pool settings first, then the user's env (which wins on a clash)."""
    r, ms, st, w = spec.redis, spec.model_server, spec.storage, spec.worker
    env: list[dict[str, Any]] = [
        {"name": "WORKER_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        _value("QUEUE", ",".join(spec.queues)),
        _value("CONSUMER_TYPE", spec.consumer_type),
        _value("REDIS_HOST", r.host),
        _value("REDIS_PORT", r.port),
        _value("REDIS_TLS", _bool(r.tls)),
    ]
    if r.tls_secret_ref:
        env += [_value(name, path) for name, path in redis_tls_file_env(r.tls_secret_ref).items()]
    if r.password_secret_ref:
        ref = r.password_secret_ref
        env.append(
            {"name": "REDIS_PASSWORD", "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.key}}}
        )
    if r.sentinel:
        env.append(_value("REDIS_SENTINEL_HOSTS", ",".join(r.sentinel.hosts)))
        env.append(_value("REDIS_SENTINEL_MASTER", r.sentinel.master))
    env += [_value("TF_HOST", ms.host), _value("TF_PORT", ms.port)]
    if st.bucket:
        env.append(_value("STORAGE_BUCKET", st.bucket))
    if st.endpoint:
        env.append(_value("STORAGE_ENDPOINT", st.endpoint))
    env.append(_value("STORAGE_PUBLIC", _bool(st.public)))
    env.append(_value("GRACE_PERIOD", f"{w.grace_seconds:g}"))
    env.append(_value("HEARTBEAT_INTERVAL", f"{w.heartbeat_interval_seconds:g}"))
    env += [_value(name, value) for name, value in postprocess_env(w.postprocess).items()]
    user = [dict(item) for item in w.env]
    overridden = {item["name"] for item in user}
    return [item for item in env if item["name"] not in overridden] + user


def build_env_from(spec: PoolSpec) -> list[dict[str, Any]]:
    """Storage credentials (a Secret of env vars, e.g. AWS_* keys) plus the user's envFrom."""
    out: list[dict[str, Any]] = []
    if spec.storage.credentials_secret_ref:
        out.append({"secretRef": {"name": spec.storage.credentials_secret_ref}})
    return out + [dict(item) for item in spec.worker.env_from]


def metrics_port(spec: PoolSpec) -> int:
    """The port worker pods serve metrics on: spec.worker.metricsPort, unless spec.worker.env sets METRICS_PORT."""
    for item in spec.worker.env:
        if item.get("name") == "METRICS_PORT" and str(item.get("value", "")).strip().isdigit():
            return int(item["value"])
    return spec.worker.metrics_port


def metrics_env_and_ports(spec: PoolSpec) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(METRICS_PORT env unless the user's env sets it, the named container port): pods only.

    Not in ``build_worker_env``: local mode runs several workers on one host, where one port cannot serve all.
    """
    port = metrics_port(spec)
    if not port:
        return [], []
    user_set = any(item.get("name") == "METRICS_PORT" for item in spec.worker.env)
    env = [] if user_set else [_value("METRICS_PORT", port)]
    return env, [{"name": METRICS_PORT_NAME, "containerPort": port, "protocol": "TCP"}]


def _container(
    spec: PoolSpec, extra_env: list[dict[str, Any]] = (), batch: int | None = None
) -> dict[str, Any]:
    w = spec.worker
    metrics_env, ports = metrics_env_and_ports(spec)
    container: dict[str, Any] = {
        "name": WORKER_CONTAINER,
        "image": w.image,
        "imagePullPolicy": w.image_pull_policy,
        "env": build_worker_env(spec) + metrics_env + list(extra_env),
    }
    if ports:
        container["ports"] = ports
    command, args = list(w.command), list(w.args)
    if batch is not None:
        if not command:
            command = [WORKER_COMMAND]
        args = args + ["--max-jobs", str(batch)]
    if command:
        container["command"] = command
    if args:
        container["args"] = args
    env_from = build_env_from(spec)
    if env_from:
        container["envFrom"] = env_from
    container["resources"] = container_resources(spec)
    container["securityContext"] = container_security_context(spec)
    container["volumeMounts"] = build_volumes(spec)[1]
    return container


def build_pod_spec(
    spec: PoolSpec, restart_policy: str = "Always", batch: int | None = None
) -> dict[str, Any]:
    w = spec.worker
    extra = [_value("MAX_JOBS", batch)] if batch is not None else []
    pod: dict[str, Any] = {
        "containers": [_container(spec, extra, batch)],
        "restartPolicy": restart_policy,
        "terminationGracePeriodSeconds": w.termination_grace_period_seconds,
        # Workers need no Kubernetes API: no token in the pod.
        "automountServiceAccountToken": False,
        "securityContext": pod_security_context(spec),
        "volumes": build_volumes(spec)[0],
    }
    if w.priority_class_name:
        pod["priorityClassName"] = w.priority_class_name
    if w.topology_spread_constraints:
        pod["topologySpreadConstraints"] = [dict(t) for t in w.topology_spread_constraints]
    if w.image_pull_secrets:
        pod["imagePullSecrets"] = [{"name": name} for name in w.image_pull_secrets]
    if w.node_selector:
        pod["nodeSelector"] = dict(w.node_selector)
    if w.tolerations:
        pod["tolerations"] = [dict(t) for t in w.tolerations]
    if w.affinity:
        pod["affinity"] = dict(w.affinity)
    if w.service_account_name:
        pod["serviceAccountName"] = w.service_account_name
    return pod


def _template(pool_name: str, spec: PoolSpec, component: str, pod_spec: dict[str, Any]) -> dict[str, Any]:
    meta: dict[str, Any] = {"labels": {**spec.worker.pod_labels, **pool_labels(pool_name, component)}}
    if spec.worker.pod_annotations:
        meta["annotations"] = dict(spec.worker.pod_annotations)
    return {"metadata": meta, "spec": pod_spec}


def build_deployment(pool_name: str, namespace: str, spec: PoolSpec, replicas: int) -> dict[str, Any]:
    """The long-lived worker Deployment of a Deployment-mode pool."""
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {
            "name": deployment_name(pool_name),
            "namespace": namespace,
            "labels": pool_labels(pool_name),
        },
        "spec": {
            "replicas": int(replicas),
            "selector": {"matchLabels": selector_labels(pool_name)},
            "template": _template(pool_name, spec, WORKER_COMPONENT, build_pod_spec(spec)),
        },
    }


def build_job(pool_name: str, namespace: str, spec: PoolSpec, index: int | str) -> dict[str, Any]:
    """One batch worker Job: takes up to batchSize items, exits 0 when done or the queue is empty."""
    j, batch = spec.scaling.job, spec.scaling.batch_size
    job_spec: dict[str, Any] = {
        "backoffLimit": j.backoff_limit,
        "ttlSecondsAfterFinished": j.ttl_seconds_after_finished,
        "completions": 1,
        "parallelism": 1,
        "template": _template(
            pool_name, spec, JOB_COMPONENT, build_pod_spec(spec, restart_policy="Never", batch=batch)
        ),
    }
    if j.active_deadline_seconds is not None:
        job_spec["activeDeadlineSeconds"] = j.active_deadline_seconds
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": job_name(pool_name, index),
            "namespace": namespace,
            "labels": pool_labels(pool_name, JOB_COMPONENT),
        },
        "spec": job_spec,
    }


def deletion_cost_patch(cost: int) -> dict[str, Any]:
    return {"metadata": {"annotations": {DELETION_COST_ANNOTATION: str(int(cost))}}}
