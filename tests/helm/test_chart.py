"""The Helm chart: lint, template, schema, real API server validation, install and upgrade.

Cluster tests use the local control plane (kube-apiserver + kwok): pods are Running but no
container runs, so the operator is started as a local process with the chart's
ServiceAccount token and the Deployment's own arguments, which also proves the chart's RBAC
is enough for the operator.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

import kiosk_protocol as protocol
from harness import rbac
from harness.cluster import LocalCluster, binary_path
from harness.cluster_fixtures import k8s_cluster, k8s_namespace  # noqa: F401
from harness.ports import free_port
from harness.procs import stop_process
from harness.wait import wait_for

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "kiosk-operator"
EXAMPLE = ROOT / "examples" / "consumerpool.yaml"
CRD_NAME = "consumerpools.kiosk.deepcell.org"

POOL_VALUES = {
    "pools": [{"name": "demo", "labels": {"team": "imaging"},
               "spec": {"queues": ["segmentation"], "worker": {"image": "kiosk-worker:0.1.0"},
                        "scaling": {"maxWorkers": 2}}}],
}
VARIANTS: dict[str, dict[str, Any]] = {
    "default": {},
    "cluster-wide": {"rbac": {"clusterWide": True}},
    "service-monitor": {"metrics": {"serviceMonitor": {"enabled": True, "labels": {"release": "prom"}}}},
    "pools": POOL_VALUES,
    "everything": {"rbac": {"clusterWide": True}, "operator": {"verbose": True, "logJson": False},
                   "metrics": {"serviceMonitor": {"enabled": True}}, "podLabels": {"a": "b"},
                   "nodeSelector": {"kubernetes.io/os": "linux"}, **POOL_VALUES},
}


# --- helpers ----------------------------------------------------------------------------------


def helm(*args: str, kubeconfig: Path | None = None, check: bool = True,
         timeout: float = 180) -> subprocess.CompletedProcess[str]:
    home = Path("/tmp/kiosk-helm")
    env = {**os.environ, "HELM_CACHE_HOME": str(home / "cache"), "HELM_CONFIG_HOME": str(home / "config"),
           "HELM_DATA_HOME": str(home / "data")}
    if kubeconfig:
        env["KUBECONFIG"] = str(kubeconfig)
    proc = subprocess.run([str(binary_path("helm")), *args], env=env, capture_output=True, text=True,
                          timeout=timeout)
    if check and proc.returncode != 0:
        command = " ".join(args)
        raise AssertionError(f"helm {command} failed ({proc.returncode}):\n{proc.stderr}{proc.stdout}")
    return proc


def values_file(tmp: Path, values: dict[str, Any]) -> Path:
    path = tmp / f"values-{abs(hash(json.dumps(values, sort_keys=True)))}.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


def render(tmp: Path, values: dict[str, Any] | None = None, namespace: str = "kiosk",
           release: str = "kiosk", crds: bool = False) -> list[dict[str, Any]]:
    args = ["template", release, str(CHART), "--namespace", namespace,
            "-f", str(values_file(tmp, values or {}))]
    if crds:
        args.append("--include-crds")
    return [doc for doc in yaml.safe_load_all(helm(*args).stdout) if doc]


def by_kind(docs: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    kinds: dict[str, list[dict[str, Any]]] = {}
    for doc in docs:
        kinds.setdefault(doc["kind"], []).append(doc)
    return kinds


def operator_container(docs: list[dict[str, Any]]) -> dict[str, Any]:
    (deployment,) = by_kind(docs)["Deployment"]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return container


# --- single sources of truth ------------------------------------------------------------------


def test_chart_crd_and_rbac_are_the_project_files() -> None:
    """The chart's copies are links to crds/ and rbac_rules.yaml; this fails if they ever drift."""
    source = (ROOT / "crds" / "consumerpool.yaml").read_bytes()
    assert (CHART / "crds" / "consumerpool.yaml").read_bytes() == source
    assert (CHART / "files" / "rbac_rules.yaml").read_bytes() == rbac.RULES_FILE.read_bytes()
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert (chart["version"], chart["appVersion"]) == ("0.1.0", "0.1.0")


def test_packaged_chart_carries_file_contents(tmp_path: Path) -> None:
    """`helm package` must store the linked files' content, not dangling links."""
    helm("package", str(CHART), "--destination", str(tmp_path))
    (archive,) = tmp_path.glob("kiosk-operator-0.1.0.tgz")
    import tarfile

    with tarfile.open(archive) as tar:
        crd = tar.extractfile("kiosk-operator/crds/consumerpool.yaml")
        rules = tar.extractfile("kiosk-operator/files/rbac_rules.yaml")
        assert crd is not None and rules is not None
        assert crd.read() == (ROOT / "crds" / "consumerpool.yaml").read_bytes()
        assert rules.read() == rbac.RULES_FILE.read_bytes()


# --- lint and template ------------------------------------------------------------------------


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_helm_lint(variant: str, tmp_path: Path) -> None:
    result = helm("lint", "--strict", str(CHART), "-f", str(values_file(tmp_path, VARIANTS[variant])))
    assert "1 chart(s) linted, 0 chart(s) failed" in result.stdout


def test_default_render(tmp_path: Path) -> None:
    docs = render(tmp_path, crds=True)
    kinds = by_kind(docs)
    assert sorted(kinds) == ["CustomResourceDefinition", "Deployment", "Role", "RoleBinding", "Service",
                             "ServiceAccount"]
    crd_source = yaml.safe_load((ROOT / "crds" / "consumerpool.yaml").read_text())
    assert kinds["CustomResourceDefinition"][0] == crd_source
    (deployment,) = kinds["Deployment"]
    spec = deployment["spec"]
    assert spec["replicas"] == 1 and spec["strategy"] == {"type": "Recreate"}
    pod = spec["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    container = operator_container(docs)
    sc = container["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]} and sc["seccompProfile"] == {"type": "RuntimeDefault"}
    assert container["resources"]["requests"] and container["resources"]["limits"]
    assert container["image"] == "kiosk-operator:0.1.0"
    assert "--namespace=kiosk" in container["args"] and "--all-namespaces" not in container["args"]
    assert "--liveness=http://0.0.0.0:8080/healthz" in container["args"]
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "liveness"}
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"metrics": 8000, "liveness": 8080}
    assert {"name": "tmp", "mountPath": "/tmp"} in container["volumeMounts"]
    assert {"name": "tmp", "emptyDir": {"sizeLimit": "64Mi"}} in pod["volumes"]
    (role,) = kinds["Role"]
    assert role["rules"] == rbac.rules() and role["metadata"]["namespace"] == "kiosk"
    (binding,) = kinds["RoleBinding"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": pod["serviceAccountName"],
                                    "namespace": "kiosk"}]
    (service,) = kinds["Service"]
    assert service["spec"]["selector"].items() <= spec["template"]["metadata"]["labels"].items()
    assert service["spec"]["ports"][0]["targetPort"] == "metrics"


def test_cluster_wide_rbac(tmp_path: Path) -> None:
    docs = render(tmp_path, VARIANTS["cluster-wide"])
    kinds = by_kind(docs)
    assert "Role" not in kinds and "RoleBinding" not in kinds
    (role,) = kinds["ClusterRole"]
    assert role["rules"] == rbac.rules()
    (binding,) = kinds["ClusterRoleBinding"]
    assert binding["roleRef"]["kind"] == "ClusterRole" and binding["subjects"][0]["namespace"] == "kiosk"
    args = operator_container(docs)["args"]
    assert "--all-namespaces" in args and not any(a.startswith("--namespace") for a in args)


def test_watch_namespaces_get_one_role_each(tmp_path: Path) -> None:
    docs = render(tmp_path, {"watchNamespaces": ["lab-a", "lab-b"]})
    roles = by_kind(docs)["Role"]
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["lab-a", "lab-b"]
    bindings = by_kind(docs)["RoleBinding"]
    assert {b["subjects"][0]["namespace"] for b in bindings} == {"kiosk"}
    args = operator_container(docs)["args"]
    assert "--namespace=lab-a" in args and "--namespace=lab-b" in args and "--namespace=kiosk" not in args


def test_service_monitor_and_example_pools(tmp_path: Path) -> None:
    docs = render(tmp_path, {**VARIANTS["service-monitor"], **POOL_VALUES})
    kinds = by_kind(docs)
    (monitor,) = kinds["ServiceMonitor"]
    (service,) = kinds["Service"]
    assert monitor["metadata"]["labels"]["release"] == "prom"
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert monitor["spec"]["endpoints"][0]["port"] == service["spec"]["ports"][0]["name"]
    (pool,) = kinds["ConsumerPool"]
    assert pool["metadata"]["name"] == "demo" and pool["metadata"]["namespace"] == "kiosk"
    assert pool["metadata"]["labels"]["team"] == "imaging"
    assert pool["spec"] == POOL_VALUES["pools"][0]["spec"]
    assert "ServiceMonitor" not in by_kind(render(tmp_path))


# --- values.schema.json -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "field"),
    [
        (["--set-string", "rbac.clusterWide=yes"], "/rbac/clusterWide': got string, want boolean"),
        (["--set", "image.pullPolicy=Sometimes"], "/image/pullPolicy"),
        (["--set", "metrics.port=70000"], "/metrics/port': maximum: got 70,000, want 65,535"),
        (["--set", "replicas=2"], "additional properties 'replicas' not allowed"),
        (["--set", "pools[0].name=Bad_Name", "--set", "pools[0].spec.queues={q}",
          "--set", "pools[0].spec.worker.image=x"], "/pools/0/name"),
        (["--set", "pools[0].name=ok"], "missing property 'spec'"),
        (["--set", "podSecurityContext.runAsNonRoot=false"], "/podSecurityContext/runAsNonRoot"),
        (["--set", "watchNamespaces={Not_A_Namespace}"], "/watchNamespaces/0"),
        (["--set", "resources.limits.memory=lots"], "/resources/limits/memory"),
    ],
)
def test_schema_rejects_bad_values_clearly(args: list[str], field: str) -> None:
    result = helm("template", "kiosk", str(CHART), *args, check=False)
    assert result.returncode != 0, result.stdout[:500]
    assert "values don't meet the specifications of the schema" in result.stderr
    assert field in result.stderr, result.stderr


def test_service_monitor_without_service_fails_clearly() -> None:
    result = helm("template", "kiosk", str(CHART), "--set", "metrics.serviceMonitor.enabled=true",
                  "--set", "metrics.service.enabled=false", check=False)
    assert result.returncode != 0
    assert "metrics.serviceMonitor.enabled needs metrics.service.enabled=true" in result.stderr


# --- the real API server ----------------------------------------------------------------------

# Our own structural schema of the few ServiceMonitor fields the chart writes, so the server's
# strict validation checks them (the test cluster has no prometheus-operator).
_ENDPOINT = {"type": "object", "properties": {
    "port": {"type": "string"},
    "path": {"type": "string"},
    "interval": {"type": "string", "pattern": "^(0|(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"},
    "scrapeTimeout": {"type": "string"},
}}
_MONITOR_SPEC = {"type": "object", "required": ["selector", "endpoints"], "properties": {
    "selector": {"type": "object", "properties": {
        "matchLabels": {"type": "object", "additionalProperties": {"type": "string"}}}},
    "namespaceSelector": {"type": "object", "properties": {
        "matchNames": {"type": "array", "items": {"type": "string"}}}},
    "endpoints": {"type": "array", "items": _ENDPOINT},
}}
SERVICE_MONITOR_CRD = {
    "apiVersion": "apiextensions.k8s.io/v1",
    "kind": "CustomResourceDefinition",
    "metadata": {"name": "servicemonitors.monitoring.coreos.com"},
    "spec": {
        "group": "monitoring.coreos.com",
        "scope": "Namespaced",
        "names": {"kind": "ServiceMonitor", "plural": "servicemonitors", "singular": "servicemonitor",
                  "listKind": "ServiceMonitorList"},
        "versions": [{"name": "v1", "served": True, "storage": True, "schema": {
            "openAPIV3Schema": {"type": "object", "properties": {"spec": _MONITOR_SPEC}}}}],
    },
}


def _established(cluster: LocalCluster, name: str) -> bool:
    obj = cluster.get(f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{name}")
    conditions = obj.get("status", {}).get("conditions", [])
    return any(c["type"] == "Established" and c["status"] == "True" for c in conditions)


@pytest.fixture(scope="module")
def crds(k8s_cluster: LocalCluster) -> LocalCluster:  # noqa: F811
    k8s_cluster.apply((CHART / "crds" / "consumerpool.yaml").read_text())
    k8s_cluster.apply(json.dumps(SERVICE_MONITOR_CRD))
    for name in (CRD_NAME, "servicemonitors.monitoring.coreos.com"):
        wait_for(lambda n=name: _established(k8s_cluster, n), 60, f"CRD {name} established")
    return k8s_cluster


def openapi_validator(cluster: LocalCluster, cache: dict[str, Any],
                      doc: dict[str, Any]) -> jsonschema.Validator:
    """kubeconform-style: the API server's own OpenAPI v3 schema for the kind, made strict."""
    group_version = doc["apiVersion"]
    path = f"api/{group_version}" if "/" not in group_version else f"apis/{group_version}"
    if path not in cache:
        index = cluster.get("/openapi/v3")["paths"]
        cache[path] = cluster.get(index[path]["serverRelativeURL"].split("?")[0])
    components = copy.deepcopy(cache[path]["components"])
    schemas = components["schemas"]
    group, _, version = group_version.rpartition("/")
    name = next(n for n, s in schemas.items() for gvk in s.get("x-kubernetes-group-version-kind", [])
                if (gvk["group"], gvk["version"], gvk["kind"]) == (group, version, doc["kind"]))
    for key in ("io.k8s.apimachinery.pkg.util.intstr.IntOrString",
                "io.k8s.apimachinery.pkg.api.resource.Quantity"):
        if key in schemas:
            schemas[key] = {"anyOf": [{"type": "integer"}, {"type": "number"}, {"type": "string"}]}

    def strict(node: Any) -> None:
        if isinstance(node, dict):
            if ("properties" in node and "additionalProperties" not in node
                    and not node.get("x-kubernetes-preserve-unknown-fields")):
                node["additionalProperties"] = False
            for value in node.values():
                strict(value)
        elif isinstance(node, list):
            for value in node:
                strict(value)

    strict(schemas)
    return jsonschema.Draft7Validator({"$ref": f"#/components/schemas/{name}", "components": components})


@pytest.mark.cluster
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_manifest_passes_server_validation(variant: str, crds: LocalCluster, k8s_namespace: str,  # noqa: F811
                                                 tmp_path: Path) -> None:
    docs = render(tmp_path, VARIANTS[variant], namespace=k8s_namespace, release=f"r-{variant}")
    manifest = "\n---\n".join(yaml.safe_dump(d) for d in docs)
    result = crds.kubectl("apply", "--dry-run=server", "--validate=strict", "-f", "-", input=manifest)
    assert result.stdout.count("(server dry run)") == len(docs), result.stdout
    cache: dict[str, Any] = {}
    for doc in docs:
        errors = sorted(openapi_validator(crds, cache, doc).iter_errors(doc), key=str)
        assert not errors, f"{doc['kind']} {doc['metadata']['name']}: {[e.message for e in errors[:5]]}"


@pytest.mark.cluster
def test_schema_check_catches_a_wrong_field(crds: LocalCluster, tmp_path: Path) -> None:
    """The kubeconform-style check is not vacuous: a misspelt field and a wrong type fail."""
    (deployment,) = by_kind(render(tmp_path))["Deployment"]
    deployment["spec"]["replica"] = 1
    deployment["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "eight"
    messages = [e.message for e in openapi_validator(crds, {}, deployment).iter_errors(deployment)]
    assert any("replica" in m for m in messages) and any("eight" in m for m in messages), messages


# --- install, operator, upgrade ---------------------------------------------------------------


def local_operator(cluster: LocalCluster, namespace: str, container: dict[str, Any], sa: str,
                   log: Path) -> tuple[subprocess.Popen[bytes], int]:
    """Run the operator as the chart's ServiceAccount with the Deployment's args (ports moved)."""
    health = free_port()
    args = [a for a in container["args"] if not a.startswith(("--metrics-port", "--liveness"))]
    args += [f"--metrics-port={free_port()}", f"--liveness=http://127.0.0.1:{health}/healthz"]
    kubeconfig = cluster.kubeconfig_for_serviceaccount(namespace, sa)
    env = {**os.environ, "KUBECONFIG": str(kubeconfig), "POD_NAMESPACE": namespace}
    env.pop("KUBERNETES_SERVICE_HOST", None)
    proc = subprocess.Popen([sys.executable, "-m", "kiosk_operator", *args], env=env,
                            stdout=open(log, "wb"), stderr=subprocess.STDOUT, cwd=ROOT)  # noqa: SIM115
    return proc, health


def example_pool_for_test(redis_port: int) -> dict[str, Any]:
    """examples/consumerpool.yaml pointed at the test Redis (no password Secret, no TF Deployment)."""
    pool = yaml.safe_load(EXAMPLE.read_text())
    pool["spec"]["redis"] = {"host": "127.0.0.1", "port": redis_port}
    del pool["spec"]["modelServer"]["deployment"]
    pool["spec"]["worker"]["nodeSelector"] = {}
    pool["spec"]["worker"]["resources"]["limits"].pop("nvidia.com/gpu")
    pool["spec"]["scaling"].update(pollingIntervalSeconds=0.3, cooldownSeconds=2)
    return pool


@pytest.mark.cluster
def test_install_run_pool_and_upgrade(crds: LocalCluster, k8s_namespace: str, redis_server,  # noqa: F811
                                      redis_client, tmp_path: Path) -> None:
    cluster, ns = crds, k8s_namespace
    kubeconfig = cluster.kubeconfig
    release = "kiosk-operator"
    installed = helm("install", release, str(CHART), "--namespace", ns, "--wait", "--timeout", "120s",
                     kubeconfig=kubeconfig).stdout
    notes = installed.split("NOTES:", 1)[1]  # what to do next
    assert f"kubectl -n {ns} rollout status deployment/kiosk-operator" in notes
    assert f"kubectl apply -n {ns} -f examples/consumerpool.yaml" in notes
    assert "kubectl get consumerpools" in notes and "kiosk submit" in notes
    deployment = cluster.kubectl_json("get", "deployment", "kiosk-operator", "-n", ns)
    assert deployment["spec"]["strategy"]["type"] == "Recreate"

    def operator_pod_running() -> bool:
        selector = "app.kubernetes.io/component=operator"
        pods = cluster.kubectl_json("get", "pods", "-n", ns, "-l", selector)["items"]
        return len(pods) == 1 and pods[0]["status"].get("phase") == "Running"

    wait_for(operator_pod_running, 60, "the operator pod Running")

    # The example file is accepted as written by the real API server (CRD validation).
    dry = cluster.kubectl("apply", "-n", ns, "--dry-run=server", "-f", str(EXAMPLE))
    assert "consumerpool.kiosk.deepcell.org/segmentation created (server dry run)" in dry.stdout

    # The operator, with the chart's ServiceAccount and args, picks the example pool up and scales it.
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    sa = deployment["spec"]["template"]["spec"]["serviceAccountName"]
    proc, health = local_operator(cluster, ns, container, sa, tmp_path / "operator.log")
    try:
        import urllib.request

        def healthy() -> bool:
            assert proc.poll() is None, (tmp_path / "operator.log").read_text()[-3000:]
            with urllib.request.urlopen(f"http://127.0.0.1:{health}/healthz", timeout=2) as resp:
                return resp.status == 200

        wait_for(healthy, 60, "operator liveness", ignore=(OSError,))
        example = tmp_path / "consumerpool.yaml"
        example.write_text(yaml.safe_dump(example_pool_for_test(redis_server.port)))
        cluster.kubectl("apply", "-n", ns, "-f", str(example))
        for i in range(6):
            protocol.submit_job(redis_client, "segmentation", f"uploads/{i}.tif")

        def worker_replicas() -> int:
            items = cluster.kubectl_json("get", "deployments", "-n", ns, "-l",
                                         "app.kubernetes.io/managed-by!=Helm")["items"]
            return sum(d["spec"].get("replicas", 0) for d in items)

        wait_for(lambda: worker_replicas() >= 2, 60, "worker Deployment scaled to ceil(6/4)=2")
        pool = cluster.kubectl_json("get", "consumerpool", "segmentation", "-n", ns)
        assert pool["status"].get("pending") == 6

        # Upgrade (chart to itself: there is no earlier release) with changed values: pool kept.
        before = cluster.kubectl_json("get", "consumerpool", "segmentation", "-n", ns)["metadata"]["uid"]
        helm("upgrade", release, str(CHART), "--namespace", ns, "--wait", "--timeout", "120s",
             "--set", "operator.verbose=true", "--set", "resources.limits.memory=512Mi",
             kubeconfig=kubeconfig)
        after = cluster.kubectl_json("get", "deployment", "kiosk-operator", "-n", ns)
        (new_container,) = after["spec"]["template"]["spec"]["containers"]
        assert "--verbose" in new_container["args"]
        assert new_container["resources"]["limits"]["memory"] == "512Mi"
        kept = cluster.kubectl_json("get", "consumerpool", "segmentation", "-n", ns)
        assert kept["metadata"]["uid"] == before
        assert cluster.kubectl_json("get", "crd", CRD_NAME)["metadata"]["name"] == CRD_NAME
        assert worker_replicas() >= 2
        history = helm("history", release, "--namespace", ns, "-o", "json", kubeconfig=kubeconfig).stdout
        assert [h["revision"] for h in json.loads(history)] == [1, 2]
    finally:
        stop_process(proc, 20)
    helm("uninstall", release, "--namespace", ns, "--wait", kubeconfig=kubeconfig)
    assert cluster.kubectl_json("get", "consumerpool", "segmentation", "-n", ns)["metadata"]["uid"] == before
