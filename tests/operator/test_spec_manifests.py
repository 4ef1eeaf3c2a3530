"""Pure tests: spec parsing/defaults, manifest builders, drift detection, the RBAC rule set."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from kiosk_operator import drift, manifests, rbac
from kiosk_operator.spec import PoolSpec, SpecError, TLSSecretRef, parse_spec
from kiosk_protocol.settings import ENV_NAMES, load_settings

CRD = yaml.safe_load((Path(__file__).resolve().parents[2] / "crds" / "consumerpool.yaml").read_text())
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


def test_defaults_match_the_crd():
    spec = parse_spec(MINIMAL)
    props = CRD["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
    sc = props["scaling"]["properties"]
    assert spec.scaling.min_workers == sc["minWorkers"]["default"]
    assert spec.scaling.max_workers == sc["maxWorkers"]["default"]
    assert spec.scaling.items_per_worker == sc["itemsPerWorker"]["default"]
    assert spec.scaling.cooldown_seconds == sc["cooldownSeconds"]["default"]
    assert spec.scaling.polling_interval_seconds == sc["pollingIntervalSeconds"]["default"]
    assert spec.scaling.batch_size == sc["batchSize"]["default"]
    assert spec.scaling.job.backoff_limit == sc["job"]["properties"]["backoffLimit"]["default"]
    assert spec.redis.port == props["redis"]["properties"]["port"]["default"]
    assert spec.model_server.host == props["modelServer"]["properties"]["host"]["default"]
    assert spec.consumer_type == props["consumerType"]["default"]
    w = props["worker"]["properties"]
    assert spec.worker.grace_seconds == w["graceSeconds"]["default"]
    assert spec.worker.termination_grace_period_seconds == w["terminationGracePeriodSeconds"]["default"]
    assert spec.reclaim.enabled is True
    ref = props["redis"]["properties"]["tlsSecretRef"]["properties"]
    assert spec.redis.tls_secret_ref is None
    assert parse_spec({**MINIMAL, "redis": {"tls": True, "tlsSecretRef": {"name": "t"}}}).redis.tls_secret_ref == (
        TLSSecretRef("t", ref["clientCertificate"]["default"])
    )


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
    assert c["resources"] == {"limits": {"nvidia.com/gpu": 1}}
    assert "command" not in c and "args" not in c
    assert pod["nodeSelector"] == {"pool": "gpu"} and pod["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert pod["serviceAccountName"] == "worker" and pod["terminationGracePeriodSeconds"] == 60
    assert pod["restartPolicy"] == "Always"
    assert manifests.label_selector("seg") == ",".join(f"{k}={v}" for k, v in sel.items())


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
        }
    ]
    assert c["volumeMounts"] == [
        {"name": manifests.REDIS_TLS_VOLUME, "mountPath": manifests.REDIS_TLS_DIR, "readOnly": True}
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
    assert "volumes" not in pod and "volumeMounts" not in c
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
    c["resources"] = {"limits": {"nvidia.com/gpu": "1", "memory": "512Mi", "cpu": "500m"}}
    for volume in pod.get("volumes", []):
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
