"""The admin policy's pure checks (kiosk_operator.policy) and the restricted worker pods (manifests)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from kiosk_operator import manifests, policy
from kiosk_operator.policy import Policy, load_policy, parse_policy, violations
from kiosk_operator.spec import SpecError, parse_spec

NS = "team-a"


def _spec(**worker: Any) -> Any:
    redis = worker.pop("redis", None)
    data: dict[str, Any] = {"queues": ["q"], "worker": {"image": "registry.example.com/kiosk/worker:1", **worker}}
    if redis is not None:
        data["redis"] = redis
    return parse_spec(data)


def test_a_plain_pool_is_allowed_by_the_default_policy():
    assert violations(Policy(), _spec(), NS) == []


@pytest.mark.parametrize(
    ("worker", "field"),
    [
        ({"serviceAccountName": "cluster-admin-sa"}, "spec.worker.serviceAccountName"),
        ({"env": [{"name": "T", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}}]},
         "spec.worker.env[0].valueFrom.secretKeyRef"),
        ({"envFrom": [{"secretRef": {"name": "s"}}]}, "spec.worker.envFrom"),
        ({"tolerations": [{"operator": "Exists"}]}, "spec.worker.tolerations[0].key"),
        ({"tolerations": [{"key": "node-role.kubernetes.io/control-plane", "operator": "Exists"}]},
         "spec.worker.tolerations[0].key"),
        ({"volumes": [{"name": "host", "hostPath": {"path": "/"}}]}, "spec.worker.volumes[0].hostPath"),
        ({"volumes": [{"name": "s", "secret": {"secretName": "x"}}]}, "spec.worker.volumes[0].secret"),
        ({"securityContext": {"privileged": True}}, "spec.worker.securityContext.privileged"),
        ({"securityContext": {"runAsUser": 0}}, "spec.worker.securityContext.runAsUser"),
        ({"securityContext": {"capabilities": {"add": ["NET_ADMIN"]}}}, "spec.worker.securityContext.capabilities"),
        ({"podSecurityContext": {"runAsNonRoot": False}}, "spec.worker.podSecurityContext.runAsNonRoot"),
        ({"priorityClassName": "system-cluster-critical"}, "spec.worker.priorityClassName"),
        ({"imagePullSecrets": [{"name": "regcred"}]}, "spec.worker.imagePullSecrets[0].name"),
        ({"redis": {"host": "evil.example.com", "passwordSecretRef": {"name": "r", "key": "p"}}}, "spec.redis.host"),
        ({"redis": {"host": "redis.other-ns.svc", "passwordSecretRef": {"name": "r", "key": "p"}}},
         "spec.redis.host"),
        ({"redis": {"passwordSecretRef": {"name": "r", "key": "p"}, "sentinel": {"hosts": ["evil.example.com:26379"]}}},
         "spec.redis.sentinel.hosts"),
    ],
)
def test_default_policy_refuses_naming_the_field(worker, field):
    found = violations(Policy(), _spec(**worker), NS)
    assert found and all(v.startswith(field) for v in found), found


@pytest.mark.parametrize(
    "worker",
    [
        {"serviceAccountName": "default"},
        {"env": [{"name": "N", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}]},
        {"tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]},
        {"volumes": [{"name": "cache", "emptyDir": {}}], "volumeMounts": [{"name": "cache", "mountPath": "/c"}]},
        {"securityContext": {"runAsUser": 20000, "readOnlyRootFilesystem": True}},
        {"redis": {"host": "redis-master", "passwordSecretRef": {"name": "r", "key": "p"}}},
        {"redis": {"host": f"redis.{NS}.svc.cluster.local", "passwordSecretRef": {"name": "r", "key": "p"}}},
        # No Secret is sent: any host.
        {"redis": {"host": "10.0.0.5"}},
    ],
)
def test_default_policy_allows_what_is_safe(worker):
    assert violations(Policy(), _spec(**worker), NS) == []


def test_admin_lists_widen_the_policy():
    pol = parse_policy({
        "allowedImagePrefixes": ["registry.example.com/kiosk/"],
        "allowedServiceAccounts": ["bucket-reader"],
        "allowedRedisHosts": ["redis.shared.svc"],
        "allowEnvFrom": True,
    })
    widened = _spec(serviceAccountName="bucket-reader", envFrom=[{"configMapRef": {"name": "c"}}])
    assert violations(pol, widened, NS) == []
    assert violations(pol, _spec(redis={"host": "redis.shared.svc", "passwordSecretRef": {"name": "r", "key": "p"}}),
                      NS) == []
    (bad,) = violations(pol, parse_spec({"queues": ["q"], "worker": {"image": "docker.io/evil/miner:1"}}), NS)
    assert bad.startswith("spec.worker.image:") and "registry.example.com/kiosk/" in bad
    # A listed host list replaces the same-namespace default.
    assert violations(pol, _spec(redis={"host": "redis", "passwordSecretRef": {"name": "r", "key": "p"}}), NS)


def test_policy_from_the_environment():
    assert not load_policy({}).configured
    chart_default = {"allowValueFrom": False, "allowedTolerationKeys": ["nvidia.com/gpu"]}
    pol = load_policy({policy.POLICY_ENV: json.dumps(chart_default)})
    assert pol.configured and pol == Policy()
    with pytest.raises(ValueError, match="policy.allowImages: unknown key"):
        parse_policy({"allowImages": True})
    with pytest.raises(ValueError, match="policy.allowEnvFrom: must be true or false"):
        parse_policy({"allowEnvFrom": "yes"})


def test_chart_values_are_exactly_the_policy_keys():
    from pathlib import Path

    import yaml

    values = yaml.safe_load((Path(__file__).resolve().parents[2] / "helm/kiosk-operator/values.yaml").read_text())
    assert parse_policy(values["policy"]) == Policy()


def test_secret_label_and_ownership():
    assert policy.secret_allowed({"metadata": {"labels": {policy.SECRET_LABEL: "true"}}})
    assert not policy.secret_allowed({"metadata": {"labels": {policy.SECRET_LABEL: "yes"}}})
    assert not policy.secret_allowed({"metadata": {}})
    pool = {"metadata": {"uid": "u1"}}
    mine = {"metadata": {"ownerReferences": [{"uid": "u1"}]}}
    other = {"metadata": {"ownerReferences": [{"uid": "u2"}]}}
    assert policy.owned_by(mine, pool) and not policy.owned_by(other, pool)
    labelled = {"metadata": {"labels": {policy.MODEL_SERVER_LABEL: "true"}}}
    assert policy.model_server_allowed(Policy(), labelled, pool)
    assert policy.model_server_allowed(Policy(), mine, pool)
    assert not policy.model_server_allowed(Policy(), {"metadata": {}}, pool)


def test_worker_pods_meet_restricted_by_default():
    pod = manifests.build_pod_spec(_spec())
    (c,) = pod["containers"]
    sc = c["securityContext"]
    assert sc["runAsNonRoot"] is True and sc["runAsUser"] == manifests.WORKER_UID == policy.WORKER_UID
    assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True
    assert sc["capabilities"] == {"drop": ["ALL"]} and sc["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["automountServiceAccountToken"] is False
    assert {"name": "tmp", "emptyDir": {"sizeLimit": manifests.TMP_SIZE_LIMIT}} in pod["volumes"]
    assert {"name": "tmp", "mountPath": "/tmp"} in c["volumeMounts"]
    assert c["resources"]["requests"]["ephemeral-storage"] and c["resources"]["limits"]["ephemeral-storage"]
    # The user's own ephemeral-storage figures win.
    own = _spec(resources={"limits": {"ephemeral-storage": "10Gi"}})
    assert manifests.build_pod_spec(own)["containers"][0]["resources"]["limits"]["ephemeral-storage"] == "10Gi"


def test_platform_fields_reach_the_pod():
    spec = _spec(
        securityContext={"runAsUser": 20000},
        podSecurityContext={"fsGroup": 3000},
        priorityClassName="batch-low",
        topologySpreadConstraints=[{"maxSkew": 1, "topologyKey": "zone", "whenUnsatisfiable": "ScheduleAnyway"}],
        volumes=[{"name": "models", "persistentVolumeClaim": {"claimName": "models"}}],
        volumeMounts=[{"name": "models", "mountPath": "/models", "readOnly": True}],
        imagePullSecrets=[{"name": "regcred"}],
    )
    pod = manifests.build_pod_spec(spec)
    c = pod["containers"][0]
    assert c["securityContext"]["runAsUser"] == 20000 and c["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["fsGroup"] == 3000
    assert pod["priorityClassName"] == "batch-low" and pod["topologySpreadConstraints"][0]["maxSkew"] == 1
    assert pod["volumes"][-1]["name"] == "models" and c["volumeMounts"][-1]["mountPath"] == "/models"
    assert pod["imagePullSecrets"] == [{"name": "regcred"}]
    allowing = parse_policy({"allowedPriorityClasses": ["batch-low"], "allowedImagePullSecrets": ["regcred"]})
    assert violations(allowing, spec, NS) == []


def test_priority_class_and_pull_secrets_are_listed_by_the_admin():
    """Refused by default (preemption, someone else's registry credentials); a list or "*" allows."""
    spec = _spec(priorityClassName="high", imagePullSecrets=[{"name": "regcred"}, {"name": "team-b-pull"}])
    assert violations(Policy(), spec, NS) == [
        "spec.worker.priorityClassName: 'high' is not an allowed PriorityClass",
        "spec.worker.imagePullSecrets[0].name: 'regcred' is not an allowed image pull Secret",
        "spec.worker.imagePullSecrets[1].name: 'team-b-pull' is not an allowed image pull Secret",
    ]
    listed = parse_policy({"allowedPriorityClasses": ["batch-low"], "allowedImagePullSecrets": ["regcred"]})
    assert violations(listed, spec, NS) == [
        "spec.worker.priorityClassName: 'high' is not an allowed PriorityClass",
        "spec.worker.imagePullSecrets[1].name: 'team-b-pull' is not an allowed image pull Secret",
    ]
    anything = parse_policy({"allowedPriorityClasses": ["*"], "allowedImagePullSecrets": ["*"]})
    assert violations(anything, spec, NS) == []
    assert violations(Policy.permissive(), spec, NS) == []
    with pytest.raises(ValueError, match="policy.allowedPriorityClasses: must be a list of strings"):
        parse_policy({"allowedPriorityClasses": "high"})


@pytest.mark.parametrize(
    ("worker", "message"),
    [
        ({"volumeMounts": [{"name": "nope", "mountPath": "/x"}]}, "spec.worker.volumeMounts[0].name"),
        ({"volumes": [{"name": "tmp", "emptyDir": {}}]}, "spec.worker.volumes: the name 'tmp'"),
        ({"imagePullSecrets": [{}]}, "spec.worker.imagePullSecrets[0].name"),
    ],
)
def test_platform_fields_are_checked(worker, message):
    with pytest.raises(SpecError, match=message.replace("[", r"\[").replace("]", r"\]")):
        _spec(**worker)


def test_cluster_wide_mode_refuses_pools_in_system_namespaces_and_its_own(monkeypatch):
    from kiosk_operator import deployment
    from kiosk_operator.__main__ import excluded_namespaces

    assert excluded_namespaces("kiosk") == ("kube-system", "kube-public", "kube-node-lease", "kiosk")
    monkeypatch.setattr(policy, "_excluded", excluded_namespaces("kiosk"))
    spec = _spec()
    for ns in ("kube-system", "kiosk"):
        pool = {"metadata": {"name": "p", "namespace": ns, "uid": "u"}}
        (why,) = deployment.refusals(None, pool, spec)
        assert why.startswith("metadata.namespace:") and repr(ns) in why
    assert deployment.refusals(None, {"metadata": {"name": "p", "namespace": "team-a", "uid": "u"}}, spec) == []


def test_a_bad_policy_stops_the_operator_with_one_line():
    import subprocess
    import sys

    env = {"PATH": "/usr/bin:/bin", "HOME": "/tmp", policy.POLICY_ENV: '{"allowImages": true}'}
    proc = subprocess.run([sys.executable, "-m", "kiosk_operator", "-n", "x", "--metrics-port", "0"],
                          capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0, proc.stderr
    assert "policy.allowImages: unknown key" in proc.stderr
