"""Pure tests: spec parsing/defaults, manifest builders, drift detection, the RBAC rule set."""

from __future__ import annotations

import copy
import dataclasses
import re
from importlib import resources
from pathlib import Path

import pytest
import yaml

from harness import rbac
from kiosk_operator import crd, drift, manifests
from kiosk_operator.crd import apply_defaults
from kiosk_operator.spec import (
    ModelServerDeployment,
    ModelServerSpec,
    PoolSpec,
    ReclaimSpec,
    RedisSpec,
    ScalingSpec,
    SentinelSpec,
    SpecError,
    StorageSpec,
    TLSSecretRef,
    WorkerSpec,
    parse_spec,
)
from kiosk_protocol.settings import ENV_NAMES, load_settings

ROOT = Path(__file__).resolve().parents[2]
CRD = yaml.safe_load((ROOT / "crds" / "consumerpool.yaml").read_text())
SPEC_SCHEMA = CRD["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
MINIMAL = {"queues": ["segmentation"], "worker": {"image": "kiosk-worker:1"}}


def full_spec() -> dict:
    return {
        "queues": ["segmentation", "segmentation-zip"],
        "consumerType": "zip",
        "worker": {
            "image": "kiosk-worker:2",
            "imagePullPolicy": "Always",
            "env": [{"name": "MAX_RETRY", "value": "2"}, {"name": "TF_PORT", "value": "9000"}],
            "envFrom": [{"configMapRef": {"name": "extra"}}],
            "resources": {"limits": {"nvidia.com/gpu": 1}},
            "nodeSelector": {"pool": "gpu"},
            "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
            "serviceAccountName": "worker",
            "terminationGracePeriodSeconds": 60,
            "graceSeconds": 45,
        },
        "redis": {
            "host": "redis",
            "port": 6380,
            "passwordSecretRef": {"name": "r", "key": "pw"},
            "tls": True,
            "tlsSecretRef": {"name": "redis-tls", "clientCertificate": True},
            "sentinel": {"hosts": ["s1:26379", "s2:26379"], "master": "main"},
        },
        "modelServer": {"host": "tfs", "port": 8600, "deployment": {"name": "tfs", "replicas": 2}},
        "storage": {"bucket": "gs://bucket", "credentialsSecretRef": {"name": "gcs"}, "public": True},
        "scaling": {
            "mode": "Job",
            "minWorkers": 0,
            "maxWorkers": 20,
            "batchSize": 25,
            "job": {"backoffLimit": 2, "ttlSecondsAfterFinished": 60, "activeDeadlineSeconds": 600},
        },
    }


def _snake(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


def _leaf_defaults(schema: dict, path: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], object]]:
    """(path, default) of every default in the schema below ``schema``, except objects' own ``{}``."""
    out = []
    for key, sub in (schema.get("properties") or {}).items():
        here = (*path, key)
        if "default" in sub and sub.get("type") != "object":
            out.append((here, sub["default"]))
        out += _leaf_defaults(sub, here)
        if isinstance(sub.get("items"), dict):
            out += _leaf_defaults(sub["items"], (*here, "[]"))
    return out


# Reaches the optional objects of the spec (redis.tlsSecretRef, redis.sentinel, modelServer.deployment).
EVERY_OBJECT = {
    **MINIMAL,
    "redis": {"tls": True, "tlsSecretRef": {"name": "t"}, "sentinel": {"hosts": ["s1:26379"]}},
    "modelServer": {"deployment": {"name": "tfs"}},
}


def _field(spec: PoolSpec, path: tuple[str, ...]) -> object:
    value: object = spec
    for key in path:
        assert hasattr(value, _snake(key)), f"spec.{'.'.join(path)}: the CRD default has no PoolSpec field"
        value = getattr(value, _snake(key))
    return value


def test_every_crd_default_reaches_the_pool_spec():
    defaults = _leaf_defaults(SPEC_SCHEMA)
    assert len(defaults) >= 25, defaults  # the walk found the schema's defaults
    minimal, every_object = parse_spec(MINIMAL), parse_spec(EVERY_OBJECT)
    for path, default in defaults:
        where = "spec." + ".".join(path)
        assert "[]" not in path, f"{where}: a default inside array items needs handling in this test"
        # Top-level fields from the minimal spec (nothing set), optional objects' fields from the other.
        inside_optional = _field(minimal, path[:-1]) is None
        value = _field(every_object if inside_optional else minimal, path)
        same_type = type(value) is type(default) or (type(value), type(default)) == (float, int)
        assert value == default and same_type, f"{where}: {value!r} != the CRD default {default!r}"


def test_dataclass_defaults_are_the_crd_defaults():
    """Built directly (tests, scaling code) or parsed from an empty spec: the same values and types."""
    parsed = parse_spec(EVERY_OBJECT)
    redis = parsed.redis
    assert repr(parsed.worker) == repr(WorkerSpec(image="kiosk-worker:1"))
    assert repr(parsed.scaling) == repr(ScalingSpec())
    assert repr(dataclasses.replace(redis, tls=False, sentinel=None, tls_secret_ref=None)) == repr(RedisSpec())
    assert repr(redis.sentinel) == repr(SentinelSpec(("s1:26379",)))
    assert repr(redis.tls_secret_ref) == repr(TLSSecretRef("t"))
    assert repr(parsed.model_server) == repr(ModelServerSpec(deployment=ModelServerDeployment("tfs")))
    assert repr(parsed.storage) == repr(StorageSpec()) and repr(parsed.reclaim) == repr(ReclaimSpec())
    assert parsed.consumer_type == PoolSpec(("q",), WorkerSpec("i")).consumer_type == "segmentation"
    # Floats stay floats: the worker env renders them ("25.0"), and drift compares that text.
    assert isinstance(parsed.worker.grace_seconds, float) and isinstance(WorkerSpec("i").grace_seconds, float)


def test_parse_spec_leaves_its_input_alone():
    data = copy.deepcopy(EVERY_OBJECT)
    parse_spec(data)
    assert data == EVERY_OBJECT


def test_null_and_blank_fields_get_the_default():
    """Null is absent, as on the API server; a blank string where the CRD has a default is the default."""
    spec = parse_spec({
        **MINIMAL,
        "consumerType": "",
        "redis": None,
        "modelServer": {"host": "", "port": None},
        "scaling": {"job": {"activeDeadlineSeconds": None}, "pollingIntervalSeconds": None},
    })
    assert spec.consumer_type == "segmentation" and spec.redis == RedisSpec()
    assert (spec.model_server.host, spec.model_server.port) == ("tf-serving", 8500)
    assert spec.scaling.job.active_deadline_seconds == 3600 and spec.scaling.polling_interval_seconds == 1.0


WALKER_SCHEMA = {
    "type": "object",
    "properties": {
        "section": {
            "type": "object",
            "default": {},
            "properties": {
                "n": {"type": "integer", "default": 1},
                "inner": {"type": "object", "properties": {"s": {"type": "string", "default": "x"}}},
                "deep": {"type": "object", "default": {}, "properties": {"b": {"type": "boolean", "default": True}}},
            },
        },
        "items": {
            "type": "array",
            "items": {"type": "object", "properties": {"on": {"type": "boolean", "default": False}}},
        },
        "byName": {
            "type": "object",
            "additionalProperties": {"type": "object", "properties": {"z": {"type": "integer", "default": 0}}},
        },
        "kept": {"type": "integer", "default": 5},
        "blank": {"type": "integer", "default": 7},
        "nullable": {"type": "integer", "nullable": True, "default": 3},
        "gone": {"type": "string"},
        "list": {"type": "array", "default": ["a"], "items": {"type": "string"}},
        "free": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
    },
}


def test_schema_defaults_fill_nested_objects_and_array_items():
    value = {
        "items": [{}, {"on": True}],
        "byName": {"a": {}, "b": {"z": 2}},
        "kept": 9,
        "blank": None,
        "nullable": None,
        "gone": None,
        "free": {"anything": [1]},
        "unknown": {"n": 0},
    }
    out = apply_defaults(value, WALKER_SCHEMA)
    assert out == {
        "section": {"n": 1, "deep": {"b": True}},  # a defaulted object gets its own defaults
        "items": [{"on": False}, {"on": True}],
        "byName": {"a": {"z": 0}, "b": {"z": 2}},
        "kept": 9,
        "blank": 7,  # null is dropped, then defaulted
        "nullable": None,
        "list": ["a"],
        "free": {"anything": [1]},
        "unknown": {"n": 0},
    }
    assert apply_defaults({"section": {"inner": {}}}, WALKER_SCHEMA)["section"]["inner"] == {"s": "x"}
    assert value["items"] == [{}, {"on": True}] and "section" not in value, "the input is not modified"
    out["list"].append("b")
    assert apply_defaults({}, WALKER_SCHEMA)["list"] == ["a"], "defaults are copied, not shared"


def test_schema_defaults_leave_wrong_types_for_the_parser():
    assert apply_defaults({"section": "text", "items": {"on": 1}}, WALKER_SCHEMA)["section"] == "text"
    assert apply_defaults("text", WALKER_SCHEMA) == "text"
    with pytest.raises(SpecError, match="^spec.redis: must be an object$"):
        parse_spec({**MINIMAL, "redis": "redis-master"})


def test_crd_file_is_the_one_the_operator_ships():
    repo_copy = ROOT / "crds" / "consumerpool.yaml"
    shipped = resources.files(crd).joinpath(crd.FILE_NAME)
    assert repo_copy.read_bytes() == shipped.read_bytes()
    assert crd.definition() == CRD and crd.spec_schema() == SPEC_SCHEMA


def test_every_crd_field_has_a_description():
    missing = []

    def walk(node, path):
        if not isinstance(node, dict):
            return
        if (
            path
            and path.split(".")[-1] not in ("metadata",)
            and "description" not in node
            and not path.endswith("[additionalProperties]")
        ):
            missing.append(path)
        for key, child in (node.get("properties") or {}).items():
            walk(child, f"{path}.{key}")
        if "items" in node:
            walk(node["items"], f"{path}[]")

    walk(CRD["spec"]["versions"][0]["schema"]["openAPIV3Schema"], "")
    assert missing == []


BAD = [
    ({"queues": []}, "spec.queues"),
    ({"queues": ["a:b"]}, "spec.queues"),
    ({"queues": ["a", "a"]}, "spec.queues"),
    ({"worker": {"image": ""}}, "spec.worker.image"),
    ({"worker": {"image": "x", "imagePullPolicy": "Sometimes"}}, "spec.worker.imagePullPolicy"),
    ({"worker": {"image": "x", "graceSeconds": 40}}, "spec.worker.graceSeconds"),
    ({"scaling": {"minWorkers": 5, "maxWorkers": 2}}, "spec.scaling.minWorkers"),
    ({"scaling": {"mode": "Pod"}}, "spec.scaling.mode"),
    ({"scaling": {"itemsPerWorker": 0}}, "spec.scaling.itemsPerWorker"),
    ({"scaling": {"pollingIntervalSeconds": "fast"}}, "spec.scaling.pollingIntervalSeconds"),
    ({"redis": {"port": 70000}}, "spec.redis.port"),
    ({"redis": {"passwordSecretRef": {"name": "x"}}}, "spec.redis.passwordSecretRef"),
    ({"redis": {"sentinel": {"hosts": ["nohost"]}}}, "spec.redis.sentinel.hosts"),
    ({"redis": {"tlsSecretRef": {"name": "t"}}}, "spec.redis.tlsSecretRef"),
    ({"redis": {"tls": True, "tlsSecretRef": {"name": " "}}}, "spec.redis.tlsSecretRef.name"),
    ({"redis": {"tls": True, "tlsSecretRef": "t"}}, "spec.redis.tlsSecretRef"),
    (
        {"redis": {"tls": True, "tlsSecretRef": {"name": "t", "clientCertificate": "yes"}}},
        "spec.redis.tlsSecretRef.clientCertificate",
    ),
    ({"redis": {"sentinel": {"hosts": ["s1:99999"]}}}, "spec.redis.sentinel.hosts"),
    ({"storage": {"bucket": "ftp://x"}}, "spec.storage.bucket"),
    ({"modelServer": {"deployment": {"replicas": 1}}}, "spec.modelServer.deployment.name"),
]


@pytest.mark.parametrize("patch,field", BAD, ids=[b[1] + str(i) for i, b in enumerate(BAD)])
def test_bad_specs_name_the_field(patch, field):
    data = copy.deepcopy(MINIMAL)
    data.update(patch)
    with pytest.raises(SpecError) as err:
        parse_spec(data)
    message = str(err.value)
    assert field in message and "\n" not in message


def test_missing_worker_is_one_line():
    with pytest.raises(SpecError, match="spec.worker"):
        parse_spec({"queues": ["q"]})


def _env(items):
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in items}


def test_worker_env_is_readable_by_the_worker_settings():
    spec = parse_spec(full_spec())
    env = manifests.build_worker_env(spec)
    names = [e["name"] for e in env]
    assert len(names) == len(set(names)), "no duplicate variables"
    plain = {e["name"]: e["value"] for e in env if "value" in e}
    assert set(plain) <= set(ENV_NAMES), set(plain) - set(ENV_NAMES)
    settings = load_settings(plain)
    assert settings.queues == ["segmentation", "segmentation-zip"]
    assert settings.consumer == "zip"
    assert (settings.redis_host, settings.redis_port, settings.redis_tls) == ("redis", 6380, True)
    assert settings.redis_sentinel_hosts == "s1:26379,s2:26379" and settings.redis_sentinel_master == "main"
    assert settings.tf_host == "tfs" and settings.tf_port == 9000  # user env wins
    assert settings.max_retry == 2
    assert settings.bucket_url == "gs://bucket" and settings.storage_public is True
    assert settings.grace_period == 45
    by_name = _env(env)
    assert by_name["REDIS_PASSWORD"] == {"secretKeyRef": {"name": "r", "key": "pw"}}
    assert by_name["WORKER_NAME"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    assert "pw" not in str(plain.values())
    tls_dir = manifests.REDIS_TLS_DIR
    assert (settings.redis_tls_ca_file, settings.redis_tls_cert_file, settings.redis_tls_key_file) == (
        f"{tls_dir}/ca.crt",
        f"{tls_dir}/tls.crt",
        f"{tls_dir}/tls.key",
    )


def test_no_password_env_without_secret():
    env = _env(manifests.build_worker_env(parse_spec(MINIMAL)))
    assert "REDIS_PASSWORD" not in env and "STORAGE_BUCKET" not in env


def test_build_deployment():
    spec = parse_spec(full_spec())
    dep = manifests.build_deployment("seg", "ns1", spec, 3)
    assert dep["metadata"]["name"] == "seg-worker" and dep["metadata"]["namespace"] == "ns1"
    assert dep["spec"]["replicas"] == 3
    sel = dep["spec"]["selector"]["matchLabels"]
    tmpl = dep["spec"]["template"]
    assert sel.items() <= tmpl["metadata"]["labels"].items()
    pod = tmpl["spec"]
    c = pod["containers"][0]
    assert c["image"] == "kiosk-worker:2" and c["imagePullPolicy"] == "Always"
    assert c["envFrom"] == [{"secretRef": {"name": "gcs"}}, {"configMapRef": {"name": "extra"}}]
    assert c["resources"] == {
        "limits": {"nvidia.com/gpu": 1, "ephemeral-storage": manifests.EPHEMERAL_LIMIT},
        "requests": {"ephemeral-storage": manifests.EPHEMERAL_REQUEST},
    }
    assert "command" not in c and "args" not in c
    assert pod["nodeSelector"] == {"pool": "gpu"} and pod["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert pod["serviceAccountName"] == "worker" and pod["terminationGracePeriodSeconds"] == 60
    assert pod["restartPolicy"] == "Always"
    assert manifests.label_selector("seg") == ",".join(f"{k}={v}" for k, v in sel.items())


TMP_VOLUME = {"name": "tmp", "emptyDir": {"sizeLimit": manifests.TMP_SIZE_LIMIT}}
TMP_MOUNT = {"name": "tmp", "mountPath": "/tmp"}


def _tls_spec(client_certificate: bool | None = None, env: list | None = None) -> PoolSpec:
    ref: dict = {"name": "redis-ca"}
    if client_certificate is not None:
        ref["clientCertificate"] = client_certificate
    worker = {"image": "kiosk-worker:1", "env": env or []}
    return parse_spec({**MINIMAL, "worker": worker, "redis": {"tls": True, "tlsSecretRef": ref}})


def _pod_and_container(obj: dict) -> tuple[dict, dict]:
    pod = obj["spec"]["template"]["spec"]
    return pod, pod["containers"][0]


@pytest.mark.parametrize("kind", ["deployment", "job"])
def test_tls_secret_mounted_read_only_with_only_the_ca(kind):
    spec = _tls_spec()
    obj = manifests.build_deployment("seg", "ns", spec, 1) if kind == "deployment" else manifests.build_job(
        "seg", "ns", spec, 0
    )
    pod, c = _pod_and_container(obj)
    assert pod["volumes"] == [
        {
            "name": manifests.REDIS_TLS_VOLUME,
            "secret": {"secretName": "redis-ca", "items": [{"key": "ca.crt", "path": "ca.crt"}]},
        },
        TMP_VOLUME,
    ]
    assert c["volumeMounts"] == [
        {"name": manifests.REDIS_TLS_VOLUME, "mountPath": manifests.REDIS_TLS_DIR, "readOnly": True},
        TMP_MOUNT,
    ]
    env = _env(c["env"])
    assert env["REDIS_TLS"] == "true"
    assert env["REDIS_TLS_CA_FILE"] == f"{manifests.REDIS_TLS_DIR}/ca.crt"
    assert "REDIS_TLS_CERT_FILE" not in env and "REDIS_TLS_KEY_FILE" not in env
    settings = load_settings({e["name"]: e["value"] for e in c["env"] if "value" in e})
    assert settings.redis_tls_ca_file == f"{manifests.REDIS_TLS_DIR}/ca.crt"


def test_tls_secret_with_client_certificate_mounts_cert_and_key():
    pod, c = _pod_and_container(manifests.build_deployment("seg", "ns", _tls_spec(True), 1))
    items = pod["volumes"][0]["secret"]["items"]
    assert [i["key"] for i in items] == ["ca.crt", "tls.crt", "tls.key"]
    env = _env(c["env"])
    mounted = {f"{manifests.REDIS_TLS_DIR}/{i['path']}" for i in items}
    assert {env["REDIS_TLS_CA_FILE"], env["REDIS_TLS_CERT_FILE"], env["REDIS_TLS_KEY_FILE"]} == mounted
    # The env points into the mount, and the mount into the volume.
    assert c["volumeMounts"][0]["name"] == pod["volumes"][0]["name"]


def test_tls_user_env_wins_and_no_volume_without_secret_ref():
    spec = _tls_spec(env=[{"name": "REDIS_TLS_CA_FILE", "value": "/custom/ca.pem"}])
    pod, c = _pod_and_container(manifests.build_deployment("seg", "ns", spec, 1))
    assert [e["value"] for e in c["env"] if e["name"] == "REDIS_TLS_CA_FILE"] == ["/custom/ca.pem"]
    plain = parse_spec({**MINIMAL, "redis": {"tls": True}})
    pod, c = _pod_and_container(manifests.build_deployment("seg", "ns", plain, 1))
    assert pod["volumes"] == [TMP_VOLUME] and c["volumeMounts"] == [TMP_MOUNT]
    assert not any(e["name"].startswith("REDIS_TLS_") for e in c["env"])


def test_build_job_runs_batch_mode():
    spec = parse_spec(full_spec())
    job = manifests.build_job("seg", "ns1", spec, 7)
    assert job["kind"] == "Job" and job["metadata"]["name"] == "seg-job-7"
    js = job["spec"]
    assert (js["backoffLimit"], js["ttlSecondsAfterFinished"], js["activeDeadlineSeconds"]) == (2, 60, 600)
    pod = js["template"]["spec"]
    assert pod["restartPolicy"] == "Never"
    c = pod["containers"][0]
    assert c["command"] == ["kiosk-worker"] and c["args"] == ["--max-jobs", "25"]
    assert _env(c["env"])["MAX_JOBS"] == "25"
    assert job["metadata"]["labels"][manifests.COMPONENT_LABEL] == manifests.JOB_COMPONENT


def test_build_job_keeps_custom_command():
    data = full_spec()
    data["worker"]["command"] = ["python", "-m", "my_consumer"]
    c = manifests.build_job("p", "n", parse_spec(data), 0)["spec"]["template"]["spec"]["containers"][0]
    assert c["command"] == ["python", "-m", "my_consumer"] and c["args"] == ["--max-jobs", "25"]


def _api_defaulted(dep: dict) -> dict:
    """What the API server returns: defaults added, quantities normalised."""
    live = copy.deepcopy(dep)
    live["metadata"]["annotations"] = {"deployment.kubernetes.io/revision": "1"}
    live["spec"]["strategy"] = {"type": "RollingUpdate"}
    pod = live["spec"]["template"]["spec"]
    pod["dnsPolicy"] = "ClusterFirst"
    c = pod["containers"][0]
    c["terminationMessagePath"] = "/dev/termination-log"
    c["resources"] = {"limits": {"nvidia.com/gpu": "1", "memory": "512Mi", "cpu": "500m", "ephemeral-storage": "2Gi"},
                      "requests": {"ephemeral-storage": "256Mi"}}
    for volume in pod.get("volumes", []):
        if "secret" in volume:
            volume["secret"]["defaultMode"] = 420
    return live


def test_drift_ignores_api_defaults_and_replicas():
    data = full_spec()
    data["worker"]["resources"] = {"limits": {"nvidia.com/gpu": 1, "memory": "0.5Gi", "cpu": 0.5}}
    want = manifests.build_deployment("seg", "ns", parse_spec(data), 2)
    live = _api_defaulted(want)
    live["spec"]["replicas"] = 9
    assert drift.deployment_drift(want, live) == []


@pytest.mark.parametrize(
    "edit", ["image", "env-added", "env-changed", "label", "sidecar", "selector", "volume", "mount"]
)
def test_drift_detects_hand_edits(edit):
    want = manifests.build_deployment("seg", "ns", parse_spec(full_spec()), 2)
    live = _api_defaulted(want)
    c = live["spec"]["template"]["spec"]["containers"][0]
    if edit == "image":
        c["image"] = "evil:1"
    elif edit == "env-added":
        c["env"].append({"name": "X", "value": "1"})
    elif edit == "env-changed":
        c["env"][1]["value"] = "other-queue"
    elif edit == "label":
        live["spec"]["template"]["metadata"]["labels"][manifests.POOL_LABEL] = "other"
    elif edit == "sidecar":
        live["spec"]["template"]["spec"]["containers"].append({"name": "side", "image": "x"})
    elif edit == "selector":
        live["spec"]["selector"]["matchLabels"] = {"a": "b"}
    elif edit == "volume":
        live["spec"]["template"]["spec"]["volumes"][0]["secret"]["secretName"] = "other"
    elif edit == "mount":
        c["volumeMounts"][0]["readOnly"] = False
    assert drift.deployment_drift(want, live)


def test_rbac_rules_cover_what_the_operator_calls():
    rules = rbac.rules()

    def allowed(group, resource, verb):
        return any(
            group in r["apiGroups"] and resource in r["resources"] and verb in r["verbs"] for r in rules
        )

    for group, resource, verbs in [
        ("kiosk.deepcell.org", "consumerpools", ["get", "list", "watch", "patch"]),
        ("kiosk.deepcell.org", "consumerpools/status", ["patch"]),
        ("apps", "deployments", ["get", "list", "watch", "create", "update", "patch"]),
        ("apps", "deployments/scale", ["patch"]),
        ("batch", "jobs", ["list", "watch", "create", "delete"]),
        ("", "pods", ["list", "watch", "patch"]),
        ("", "events", ["create"]),
        ("", "secrets", ["get"]),
    ]:
        for verb in verbs:
            assert allowed(group, resource, verb), (group, resource, verb)
    assert not allowed("", "secrets", "list"), "secrets are read one by name only"
    role = rbac.role("op", "ns")
    binding = rbac.role_binding("op", "ns", "op")
    assert role["rules"] == rules and binding["roleRef"]["name"] == "op"
    assert rbac.cluster_role("op")["kind"] == "ClusterRole"


def test_pool_spec_is_frozen():
    spec = parse_spec(MINIMAL)
    assert isinstance(spec, PoolSpec)
    with pytest.raises(AttributeError):
        spec.queues = ("x",)  # type: ignore[misc]


# --- worker metrics port (spec.worker.metricsPort) ---------------------------------------------


def _metrics_of(obj: dict) -> tuple[str | None, list[dict]]:
    _, c = _pod_and_container(obj)
    return _env(c["env"]).get("METRICS_PORT"), c.get("ports", [])


@pytest.mark.parametrize("kind", ["deployment", "job"])
def test_worker_pods_serve_metrics_on_a_named_port_by_default(kind):
    default = SPEC_SCHEMA["properties"]["worker"]["properties"]["metricsPort"]["default"]
    assert isinstance(default, int) and default > 0, "worker metrics are on by default"
    spec = parse_spec(MINIMAL)
    assert spec.worker.metrics_port == default == WorkerSpec("i").metrics_port
    build = manifests.build_deployment if kind == "deployment" else manifests.build_job
    obj = build("seg", "ns", spec, 0)
    env, ports = _metrics_of(obj)
    assert env == str(default)
    assert ports == [{"name": manifests.METRICS_PORT_NAME, "containerPort": default, "protocol": "TCP"}]
    # The worker reads the variable as its METRICS_PORT setting.
    _, c = _pod_and_container(obj)
    plain = {e["name"]: e["value"] for e in c["env"] if "value" in e}
    assert load_settings(plain).metrics_port == default


def test_worker_metrics_port_set_or_off():
    on = parse_spec({**MINIMAL, "worker": {"image": "w", "metricsPort": 9400}})
    assert _metrics_of(manifests.build_deployment("p", "n", on, 1)) == (
        "9400", [{"name": "metrics", "containerPort": 9400, "protocol": "TCP"}])
    off = parse_spec({**MINIMAL, "worker": {"image": "w", "metricsPort": 0}})
    assert _metrics_of(manifests.build_deployment("p", "n", off, 1)) == (None, [])
    assert _metrics_of(manifests.build_job("p", "n", off, 1)) == (None, [])


def test_metrics_port_in_the_users_env_wins_once():
    spec = parse_spec({**MINIMAL, "worker": {"image": "w", "env": [{"name": "METRICS_PORT", "value": "9500"}]}})
    _, c = _pod_and_container(manifests.build_deployment("p", "n", spec, 1))
    assert [e for e in c["env"] if e["name"] == "METRICS_PORT"] == [{"name": "METRICS_PORT", "value": "9500"}]
    assert c["ports"] == [{"name": "metrics", "containerPort": 9500, "protocol": "TCP"}]


def test_local_mode_env_has_no_metrics_port():
    """Local mode runs several workers on one host: one METRICS_PORT for all of them would clash."""
    assert "METRICS_PORT" not in _env(manifests.build_worker_env(parse_spec(MINIMAL)))


@pytest.mark.parametrize("value", [-1, 65536, "8000", True, 1.5])
def test_bad_metrics_port_names_the_field(value):
    with pytest.raises(SpecError, match=r"^spec\.worker\.metricsPort: "):
        parse_spec({**MINIMAL, "worker": {"image": "w", "metricsPort": value}})


# ---- spec.worker.postprocess: deep-watershed parameters as POSTPROCESS_* worker variables ----

POSTPROCESS_FIELDS = {
    "radius": 4, "maximaThreshold": 0.25, "interiorThreshold": 0.2, "maximaSmooth": 0.5,
    "interiorSmooth": 2, "maximaIndex": 1, "interiorIndex": -2, "labelErosion": 1,
    "smallObjectsThreshold": 15, "fillHolesThreshold": 15, "pixelExpansion": 3,
    "maximaAlgorithm": "peak_local_max", "excludeBorder": True,
}


def _postprocess_settings(spec: PoolSpec) -> dict:
    plain = {e["name"]: e["value"] for e in manifests.build_worker_env(spec) if "value" in e}
    settings = load_settings(plain)
    return {_snake(k): getattr(settings, "postprocess_" + _snake(k)) for k in POSTPROCESS_FIELDS}


def test_postprocess_defaults_are_the_workers_defaults():
    """The CRD's defaults (deepcell-toolbox's) reach the worker, and equal the worker's own defaults."""
    env = _env(manifests.build_worker_env(parse_spec(MINIMAL)))
    assert {name for name in env if name.startswith("POSTPROCESS_")} <= set(ENV_NAMES)
    assert len([name for name in env if name.startswith("POSTPROCESS_")]) == len(POSTPROCESS_FIELDS)
    worker_defaults = load_settings({})
    assert _postprocess_settings(parse_spec(MINIMAL)) == {
        _snake(k): getattr(worker_defaults, "postprocess_" + _snake(k)) for k in POSTPROCESS_FIELDS}
    assert _postprocess_settings(parse_spec(MINIMAL))["radius"] == 10


def test_postprocess_fields_reach_the_worker():
    spec = parse_spec({**MINIMAL, "worker": {"image": "w", "postprocess": POSTPROCESS_FIELDS}})
    assert _postprocess_settings(spec) == {_snake(k): v for k, v in POSTPROCESS_FIELDS.items()}
    # The user's env still wins over a rendered variable.
    user = {"image": "w", "postprocess": {"radius": 4}, "env": [{"name": "POSTPROCESS_RADIUS", "value": "7"}]}
    env = manifests.build_worker_env(parse_spec({**MINIMAL, "worker": user}))
    assert [e["value"] for e in env if e["name"] == "POSTPROCESS_RADIUS"] == ["7"]


@pytest.mark.parametrize("field,value", [
    ("radius", 0), ("radius", 2.5), ("maximaThreshold", -0.1), ("maximaSmooth", -1), ("interiorThreshold", "low"),
    ("maximaIndex", True), ("labelErosion", -1), ("pixelExpansion", "2"), ("maximaAlgorithm", "watershed"),
    ("excludeBorder", "yes"),
])
def test_bad_postprocess_fields_name_the_field(field, value):
    with pytest.raises(SpecError) as err:
        parse_spec({**MINIMAL, "worker": {"image": "w", "postprocess": {field: value}}})
    assert str(err.value).startswith(f"spec.worker.postprocess.{field}: ") and "\n" not in str(err.value)


def test_postprocess_changes_are_drift():
    want = manifests.build_deployment("seg", "ns", parse_spec(full_spec()), 2)
    other = full_spec()
    other["worker"]["postprocess"] = {"interiorThreshold": 0.2}
    live = manifests.build_deployment("seg", "ns", parse_spec(other), 2)
    assert drift.deployment_drift(want, live)
