"""The Helm chart: lint, template, schema, real API server validation, install and upgrade.

Cluster tests use the local control plane (kube-apiserver + kwok): pods are Running but no
container runs, so the operator is started as a local process with the chart's
ServiceAccount token and the Deployment's own arguments, which also proves the chart's RBAC
is enough for the operator. Tests that own the cluster-wide ConsumerPool CRD (crds.install)
start a control plane of their own, so the session's CRD is never touched.

`helm template` is given --kube-version to render for the API server the tests run. Without it
helm assumes the Kubernetes version it was built for; tools/cluster/build.sh sets that as helm's
release build does (a plain `go install` leaves helm's fallback, v1.20, below our kubeVersion).
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

import kiosk_protocol as protocol
from harness import rbac
from harness.cluster import LocalCluster, binary_path, binary_versions
from harness.cluster_fixtures import k8s_cluster, k8s_namespace  # noqa: F401
from harness.helm import helm
from harness.ports import free_port
from harness.procs import stop_process
from harness.wait import wait_for
from kiosk_operator import manifests

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "kiosk-operator"
EXAMPLE = ROOT / "examples" / "consumerpool.yaml"
CRD_NAME = "consumerpools.kiosk.deepcell.org"
CRD_SOURCE = yaml.safe_load((ROOT / "crds" / "consumerpool.yaml").read_text())
#: The test cluster's version, for `helm template` (see the module docstring).
KUBE_VERSION = binary_versions()["kube-apiserver"]
COMMON_LABELS = {"team": "imaging", "cost-center": "lab-42"}

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
    # What platform teams set: labels, volumes, extra objects, Helm-managed CRD, worker monitoring.
    "platform": {
        "commonLabels": COMMON_LABELS,
        "crds": {"install": True},
        "metrics": {"serviceMonitor": {"enabled": True}, "podMonitor": {"enabled": True}},
        "extraVolumes": [{"name": "redis-ca", "configMap": {"name": "redis-ca"}}],
        "extraVolumeMounts": [{"name": "redis-ca", "mountPath": "/etc/redis-ca", "readOnly": True}],
        "extraObjects": [
            {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "{{ .Release.Name }}-settings"},
             "data": {"release": "{{ .Release.Name }}"}},
            "apiVersion: v1\nkind: Secret\nmetadata:\n  name: {{ .Release.Name }}-redis\n"
            "stringData:\n  redis-password: change-me\n",
        ],
        "global": {"imageRegistry": "registry.example.com"},
        **POOL_VALUES,
    },
}


# --- helpers ----------------------------------------------------------------------------------




def values_file(tmp: Path, values: dict[str, Any]) -> Path:
    path = tmp / f"values-{abs(hash(json.dumps(values, sort_keys=True)))}.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


def render(tmp: Path, values: dict[str, Any] | None = None, namespace: str = "kiosk",
           release: str = "kiosk", crds: bool = False, chart: Path = CHART) -> list[dict[str, Any]]:
    args = ["template", release, str(chart), "--namespace", namespace, "--kube-version", KUBE_VERSION,
            "-f", str(values_file(tmp, values or {}))]
    if crds:
        args.append("--include-crds")
    return [doc for doc in yaml.safe_load_all(helm(*args).stdout) if doc]


def template_fails(*args: str, chart: Path = CHART) -> str:
    """stderr of a `helm template` that must fail."""
    result = helm("template", "kiosk", str(chart), "--kube-version", KUBE_VERSION, *args, check=False)
    assert result.returncode != 0, result.stdout[:500]
    return result.stderr


def by_kind(docs: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    kinds: dict[str, list[dict[str, Any]]] = {}
    for doc in docs:
        kinds.setdefault(doc["kind"], []).append(doc)
    return kinds


def operator_container(docs: list[dict[str, Any]]) -> dict[str, Any]:
    (deployment,) = by_kind(docs)["Deployment"]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return container


#: Paths only a checkout of the repository has; what a packaged chart prints must not use them.
REPOSITORY_PATH = re.compile(r"examples/|crds/consumerpool\.yaml|helm/kiosk-operator|operator/kiosk_operator|tools/")


def notes_pool_command(notes: str) -> str:
    """The `kubectl apply ... <<'EOF' ... EOF` the install notes print, as a shell script."""
    found = re.findall(r"^(kubectl apply -n \S+ -f - <<'EOF'\n.*?^EOF)$", notes, re.M | re.S)
    assert len(found) == 1, notes
    return found[0] + "\n"


def kubectl_dir(tmp: Path) -> Path:
    """A directory holding the built kubectl under its plain name, for PATH."""
    bindir = tmp / "kubectl-bin"
    bindir.mkdir(exist_ok=True)
    if not (bindir / "kubectl").exists():
        (bindir / "kubectl").symlink_to(binary_path("kubectl"))
    return bindir


def labels_of(doc: dict[str, Any]) -> dict[str, str]:
    return doc["metadata"].get("labels") or {}


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
    with tarfile.open(archive) as tar:
        crd = tar.extractfile("kiosk-operator/crds/consumerpool.yaml")
        rules = tar.extractfile("kiosk-operator/files/rbac_rules.yaml")
        assert crd is not None and rules is not None
        assert crd.read() == (ROOT / "crds" / "consumerpool.yaml").read_bytes()
        assert rules.read() == rbac.RULES_FILE.read_bytes()


# --- lint and template ------------------------------------------------------------------------


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_helm_lint(variant: str, tmp_path: Path) -> None:
    result = helm("lint", "--strict", str(CHART), "-f", str(values_file(tmp_path, VARIANTS[variant])),
                  "--kube-version", KUBE_VERSION)
    assert "1 chart(s) linted, 0 chart(s) failed" in result.stdout
    assert "[INFO]" not in result.stdout and "[WARNING]" not in result.stdout, result.stdout  # e.g. no icon


def test_default_render(tmp_path: Path) -> None:
    docs = render(tmp_path, crds=True)
    kinds = by_kind(docs)
    assert sorted(kinds) == ["CustomResourceDefinition", "Deployment", "Role", "RoleBinding", "Service",
                             "ServiceAccount", "ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding"]
    assert kinds["CustomResourceDefinition"] == [CRD_SOURCE]  # from crds/, once
    assert "CustomResourceDefinition" not in by_kind(render(tmp_path))  # crds.install is off
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
        (["--set-string", "crds.install=yes"], "/crds/install': got string, want boolean"),
        (["--set", "commonLabels.team=7"], "/commonLabels/team': got number, want string"),
        (["--set", "commonLabels.bad/key/x=a"], "invalid propertyName 'bad/key/x'"),
        (["--set", "extraVolumeMounts[0].name=ca"], "missing property 'mountPath'"),
        (["--set", "extraVolumes[0].configMap.name=ca"], "missing property 'name'"),
        (["--set", "extraObjects[0].kind=ConfigMap"], "/extraObjects/0"),
        (["--set", "metrics.podMonitor.interval=often"], "/metrics/podMonitor/interval"),
        (["--set", "global=flat"], "/global': got string, want object"),
    ],
)
def test_schema_rejects_bad_values_clearly(args: list[str], field: str) -> None:
    stderr = template_fails(*args)
    assert "values don't meet the specifications of the schema" in stderr
    assert field in stderr, stderr


def test_service_monitor_without_service_fails_clearly() -> None:
    stderr = template_fails("--set", "metrics.serviceMonitor.enabled=true", "--set", "metrics.service.enabled=false")
    assert "metrics.serviceMonitor.enabled needs metrics.service.enabled=true" in stderr


# --- the real API server ----------------------------------------------------------------------

# Our own structural schema of the few ServiceMonitor fields the chart writes, so the server's
# strict validation checks them (the test cluster has no prometheus-operator).
_ENDPOINT = {"type": "object", "properties": {
    "port": {"type": "string"},
    "path": {"type": "string"},
    "honorLabels": {"type": "boolean"},
    "interval": {"type": "string", "pattern": "^(0|(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"},
    "scrapeTimeout": {"type": "string"},
}}
_POD_ENDPOINT = {"type": "object", "properties": {
    **_ENDPOINT["properties"],
    "relabelings": {"type": "array", "items": {"type": "object", "properties": {
        "sourceLabels": {"type": "array", "items": {"type": "string", "pattern": "^[a-zA-Z_][a-zA-Z0-9_]*$"}},
        "targetLabel": {"type": "string"}}}},
}}
_MONITOR_SPEC = {"type": "object", "required": ["selector", "endpoints"], "properties": {
    "selector": {"type": "object", "properties": {
        "matchLabels": {"type": "object", "additionalProperties": {"type": "string"}}}},
    "namespaceSelector": {"type": "object", "properties": {
        "matchNames": {"type": "array", "items": {"type": "string"}}}},
    "endpoints": {"type": "array", "items": _ENDPOINT},
}}
_POD_MONITOR_SPEC = {"type": "object", "required": ["selector", "podMetricsEndpoints"], "properties": {
    "selector": _MONITOR_SPEC["properties"]["selector"],
    "namespaceSelector": {"type": "object", "properties": {
        "any": {"type": "boolean"}, "matchNames": {"type": "array", "items": {"type": "string"}}}},
    "podMetricsEndpoints": {"type": "array", "items": _POD_ENDPOINT},
}}


def monitoring_crd(kind: str, spec_schema: dict[str, Any]) -> dict[str, Any]:
    plural = kind.lower() + "s"
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.monitoring.coreos.com"},
        "spec": {
            "group": "monitoring.coreos.com",
            "scope": "Namespaced",
            "names": {"kind": kind, "plural": plural, "singular": kind.lower(), "listKind": f"{kind}List"},
            "versions": [{"name": "v1", "served": True, "storage": True, "schema": {
                "openAPIV3Schema": {"type": "object", "properties": {"spec": spec_schema}}}}],
        },
    }


MONITORING_CRDS = [monitoring_crd("ServiceMonitor", _MONITOR_SPEC), monitoring_crd("PodMonitor", _POD_MONITOR_SPEC)]


def _established(cluster: LocalCluster, name: str) -> bool:
    obj = cluster.get(f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{name}")
    conditions = (obj.get("status") or {}).get("conditions") or []  # null while the server sets it up
    return any(c["type"] == "Established" and c["status"] == "True" for c in conditions)


@pytest.fixture(scope="module")
def crds(k8s_cluster: LocalCluster) -> LocalCluster:  # noqa: F811
    k8s_cluster.apply((CHART / "crds" / "consumerpool.yaml").read_text())
    k8s_cluster.apply(MONITORING_CRDS)
    for name in (CRD_NAME, *(crd["metadata"]["name"] for crd in MONITORING_CRDS)):
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
    assert "kubectl get consumerpools" in notes and "kiosk submit" in notes
    assert not REPOSITORY_PATH.search(notes), "the notes point at files only a checkout has"
    # The pool the notes print is accepted by the real API server as pasted (placeholders filled).
    paste = notes_pool_command(notes).replace("<registry>", "registry.example.com")
    paste = paste.replace("<bucket>", "kiosk-bucket").replace("kubectl apply", "kubectl apply --dry-run=server", 1)
    result = subprocess.run(["bash", "-c", paste], capture_output=True, text=True, timeout=60,
                            env={**os.environ, "PATH": f"{kubectl_dir(tmp_path)}:{os.environ['PATH']}",
                                 "KUBECONFIG": str(kubeconfig)})
    assert result.returncode == 0, result.stderr
    assert "consumerpool.kiosk.deepcell.org/segmentation created (server dry run)" in result.stdout
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

        # Worker metrics are on by default: every worker pod gets METRICS_PORT and the named port
        # the chart's PodMonitor scrapes, and the PodMonitor's selector picks exactly these pods.
        default_port = CRD_SOURCE["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"][
            "properties"]["worker"]["properties"]["metricsPort"]["default"]

        def worker_pods() -> list[dict[str, Any]]:
            pods = cluster.kubectl_json("get", "pods", "-n", ns, "-l", manifests.label_selector("segmentation"))
            return pods["items"] if len(pods["items"]) >= 2 else []

        (monitor,) = by_kind(render(tmp_path, {"metrics": {"podMonitor": {"enabled": True}}}, namespace=ns))[
            "PodMonitor"]
        selector = monitor["spec"]["selector"]["matchLabels"]
        for pod in wait_for(worker_pods, 60, "2 worker pods"):
            (worker,) = pod["spec"]["containers"]
            env = {e["name"]: e.get("value") for e in worker["env"]}
            assert env["METRICS_PORT"] == str(default_port)
            assert {"name": "metrics", "containerPort": default_port, "protocol": "TCP"} in worker["ports"]
            assert selector.items() <= pod["metadata"]["labels"].items()
            assert pod["metadata"]["namespace"] in monitor["spec"]["namespaceSelector"]["matchNames"]
        assert monitor["spec"]["podMetricsEndpoints"][0]["port"] == "metrics"
        operator_pods = cluster.kubectl_json("get", "pods", "-n", ns, "-l", "app.kubernetes.io/component=operator")
        assert not any(selector.items() <= p["metadata"]["labels"].items() for p in operator_pods["items"])

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

    # With no operator left, a deleted pool keeps kopf's finalizer and stays Terminating; the
    # README's command releases it.
    cluster.kubectl("delete", "consumerpool", "segmentation", "-n", ns, "--wait=false")
    stuck = cluster.kubectl_json("get", "consumerpool", "segmentation", "-n", ns)["metadata"]
    assert stuck.get("deletionTimestamp") and stuck["finalizers"] == ["kiosk.deepcell.org/kopf-finalizer"]
    readme = (ROOT / "README.md").read_text()
    inline = re.findall(r"`([^`\n]+)`", readme)
    (release_it,) = [c for c in inline if c.startswith("kubectl -n kiosk patch consumerpool")]
    result = subprocess.run(["bash", "-c", release_it.replace("-n kiosk", f"-n {ns}", 1)], capture_output=True,
                            text=True, timeout=60, env={**os.environ, "KUBECONFIG": str(kubeconfig),
                                                        "PATH": f"{kubectl_dir(tmp_path)}:{os.environ['PATH']}"})
    assert result.returncode == 0, result.stderr

    def pool_gone() -> bool:
        return not cluster.kubectl_json("get", "consumerpools", "-n", ns)["items"]

    wait_for(pool_gone, 30, "the pool deleted once its finalizer is removed")


# --- chart metadata -----------------------------------------------------------------------------


def test_chart_metadata_for_repositories_and_kubernetes_version(tmp_path: Path) -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["kubeVersion"] == ">=1.25.0-0"  # the CRD's CEL rules
    assert chart["sources"] and all(url.startswith("https://") for url in chart["sources"])
    assert chart["icon"].startswith("https://")
    assert chart["maintainers"] and all(m["name"] for m in chart["maintainers"])
    stderr = helm("template", "kiosk", str(CHART), "--kube-version", "1.24.9", check=False).stderr
    assert "chart requires kubeVersion: >=1.25.0-0" in stderr
    assert render(tmp_path)  # and KUBE_VERSION, the test cluster's, is accepted
    readme = helm("show", "readme", str(CHART)).stdout
    assert "crds.install" in readme and "--skip-crds" in readme


# --- what platform teams set: labels, volumes, extra objects ------------------------------------


@pytest.mark.parametrize("scope", [{}, {"rbac": {"clusterWide": True}}], ids=["namespaced", "cluster-wide"])
def test_common_labels_on_every_rendered_object(scope: dict[str, Any], tmp_path: Path) -> None:
    docs = render(tmp_path, {**VARIANTS["platform"], **scope})
    kinds = by_kind(docs)
    assert {"CustomResourceDefinition", "Deployment", "Service", "ServiceAccount", "ServiceMonitor", "PodMonitor",
            "ConsumerPool", "ConfigMap", "Secret"} <= set(kinds), sorted(kinds)
    assert {"ClusterRole", "ClusterRoleBinding"} <= set(kinds) if scope else {"Role", "RoleBinding"} <= set(kinds)
    for doc in docs:
        assert COMMON_LABELS.items() <= labels_of(doc).items(), f"{doc['kind']} {doc['metadata']['name']}"
    (deployment,) = kinds["Deployment"]
    template_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert COMMON_LABELS.items() <= template_labels.items()
    assert "team" not in deployment["spec"]["selector"]["matchLabels"]  # selectors are immutable
    assert not any("team" in labels_of(doc) for doc in render(tmp_path, scope))


def test_common_labels_never_replace_the_charts_own(tmp_path: Path) -> None:
    clash = {"app.kubernetes.io/name": "other", "app.kubernetes.io/component": "other", "team": "imaging"}
    docs = render(tmp_path, {"commonLabels": clash, "metrics": {"serviceMonitor": {"enabled": True}}})
    kinds = by_kind(docs)
    (deployment,) = kinds["Deployment"]
    (service,) = kinds["Service"]
    (monitor,) = kinds["ServiceMonitor"]
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert labels_of(deployment)["app.kubernetes.io/name"] == "kiosk-operator"
    assert labels_of(deployment)["app.kubernetes.io/component"] == "operator"
    assert pod_labels["app.kubernetes.io/component"] == "operator" and pod_labels["team"] == "imaging"
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert monitor["spec"]["selector"]["matchLabels"].items() <= labels_of(service).items()


def test_extra_objects_are_rendered_with_tpl(tmp_path: Path) -> None:
    values = {
        "commonLabels": COMMON_LABELS,
        "extraObjects": [
            {"apiVersion": "v1", "kind": "ConfigMap",
             "metadata": {"name": "{{ .Release.Name }}-settings", "labels": {"team": "own"}},
             "data": {"namespace": "{{ .Release.Namespace }}", "chart": "{{ .Chart.Version }}"}},
            "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {{ include \"kiosk-operator.fullname\" . }}-a\n"
            "---\napiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {{ .Release.Name }}-b\n",
        ],
    }
    docs = render(tmp_path, values, release="rel", namespace="lab")
    maps = {d["metadata"]["name"]: d for d in by_kind(docs)["ConfigMap"]}
    assert sorted(maps) == ["rel-b", "rel-kiosk-operator-a", "rel-settings"]
    assert maps["rel-settings"]["data"] == {"namespace": "lab", "chart": "0.1.0"}
    assert labels_of(maps["rel-settings"]) == {"team": "own", "cost-center": "lab-42"}  # its own label wins
    assert labels_of(maps["rel-b"]) == COMMON_LABELS
    assert "ConfigMap" not in by_kind(render(tmp_path))

    bad = values_file(tmp_path, {"extraObjects": ["kind: [unclosed"]})
    assert "extraObjects[0] is not valid YAML" in template_fails("-f", str(bad))
    nameless = values_file(tmp_path, {"extraObjects": ["apiVersion: v1\nkind: ConfigMap\n"]})
    assert "extraObjects[0]: every object needs apiVersion, kind and metadata.name" in template_fails(
        "-f", str(nameless))


def test_extra_volumes_and_mounts_for_the_operator(tmp_path: Path) -> None:
    docs = render(tmp_path, VARIANTS["platform"])
    (deployment,) = by_kind(docs)["Deployment"]
    pod = deployment["spec"]["template"]["spec"]
    container = operator_container(docs)
    assert pod["volumes"] == [{"name": "tmp", "emptyDir": {"sizeLimit": "64Mi"}},
                              *VARIANTS["platform"]["extraVolumes"]]
    assert container["volumeMounts"] == [{"name": "tmp", "mountPath": "/tmp"},
                                         *VARIANTS["platform"]["extraVolumeMounts"]]
    assert "extraVolumes" in template_fails("--set", "extraVolumes[0].name=tmp", "--set",
                                            "extraVolumes[0].emptyDir.medium=Memory")


# --- the CRD: crds/ folder by default, a release object with crds.install -----------------------


def test_crds_install_renders_the_one_crd_file_once(tmp_path: Path) -> None:
    docs = render(tmp_path, {"crds": {"install": True}, "commonLabels": COMMON_LABELS})
    (crd,) = by_kind(docs)["CustomResourceDefinition"]
    assert crd["spec"] == CRD_SOURCE["spec"]  # the same file, nothing lost in the template round trip
    assert crd["metadata"]["name"] == CRD_NAME
    assert crd["metadata"]["annotations"] == {"helm.sh/resource-policy": "keep"}
    labels = labels_of(crd)
    assert CRD_SOURCE["metadata"]["labels"].items() <= labels.items() and COMMON_LABELS.items() <= labels.items()
    assert labels["app.kubernetes.io/managed-by"] == "Helm"
    # Default: nothing in the templates; Helm's crds/ folder holds it (installed, never upgraded).
    assert "CustomResourceDefinition" not in by_kind(render(tmp_path))
    assert [d["kind"] for d in render(tmp_path, crds=True)].count("CustomResourceDefinition") == 1
    # One source: no file of the chart but the link carries a CRD schema.
    copies = [f for f in CHART.rglob("*") if f.is_file() and not f.is_symlink() and "openAPIV3Schema" in f.read_text()]
    assert copies == [], copies
    assert (CHART / "crds" / "consumerpool.yaml").resolve() == (ROOT / "operator" / "kiosk_operator" / "crd" /
                                                                "consumerpool.yaml")


# --- worker monitoring --------------------------------------------------------------------------


def test_pod_monitor_selects_the_worker_pods_the_operator_renders(tmp_path: Path) -> None:
    assert "PodMonitor" not in by_kind(render(tmp_path))
    enabled = {"metrics": {"podMonitor": {"enabled": True, "labels": {"release": "prom"}, "interval": "15s"}}}
    docs = render(tmp_path, enabled)
    (monitor,) = by_kind(docs)["PodMonitor"]
    spec = monitor["spec"]
    selector = spec["selector"]["matchLabels"]
    for component in (manifests.WORKER_COMPONENT, manifests.JOB_COMPONENT):
        assert selector.items() <= manifests.pool_labels("seg", component).items(), component
    (deployment,) = by_kind(docs)["Deployment"]
    assert not selector.items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    (endpoint,) = spec["podMetricsEndpoints"]
    assert endpoint["port"] == manifests.METRICS_PORT_NAME and endpoint["interval"] == "15s"
    pool_meta_label = "__meta_kubernetes_pod_label_" + re.sub(r"[^a-zA-Z0-9_]", "_", manifests.POOL_LABEL)
    assert {"sourceLabels": [pool_meta_label], "targetLabel": "pool"} in endpoint["relabelings"]
    assert labels_of(monitor)["release"] == "prom"
    assert spec["namespaceSelector"] == {"matchNames": ["kiosk"]}
    (lab,) = by_kind(render(tmp_path, {**enabled, "watchNamespaces": ["lab-a", "lab-b"]}))["PodMonitor"]
    assert lab["spec"]["namespaceSelector"] == {"matchNames": ["lab-a", "lab-b"]}
    (wide,) = by_kind(render(tmp_path, {**enabled, "rbac": {"clusterWide": True}}))["PodMonitor"]
    assert wide["spec"]["namespaceSelector"] == {"any": True}


# --- as a subchart of an umbrella chart ---------------------------------------------------------


@pytest.fixture(scope="module")
def umbrella(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A platform team's umbrella chart with this chart as a file:// dependency, built offline."""
    root = tmp_path_factory.mktemp("umbrella") / "platform"
    root.mkdir()
    (root / "Chart.yaml").write_text(yaml.safe_dump({
        "apiVersion": "v2", "name": "platform", "version": "1.0.0",
        "dependencies": [{"name": "kiosk-operator", "version": "0.1.0", "repository": f"file://{CHART}",
                          "condition": "kiosk-operator.enabled"}],
    }))
    (root / "values.yaml").write_text(yaml.safe_dump({
        "global": {"imageRegistry": "registry.example.com", "storageClass": "fast"},
        "kiosk-operator": {"enabled": True, "commonLabels": COMMON_LABELS},
    }))
    helm("dependency", "build", str(root), "--skip-refresh")
    assert (root / "charts" / "kiosk-operator-0.1.0.tgz").is_file()
    return root


def test_chart_works_as_a_subchart(umbrella: Path, tmp_path: Path) -> None:
    docs = render(tmp_path, {"global": {"team": "imaging"}}, release="platform", chart=umbrella)
    (deployment,) = by_kind(docs)["Deployment"]
    assert deployment["metadata"]["name"] == "platform-kiosk-operator"
    assert COMMON_LABELS.items() <= labels_of(deployment).items()
    # The subchart's schema still applies under the umbrella, to the subchart's values only.
    stderr = template_fails("--set", "kiosk-operator.replicas=2", chart=umbrella)
    assert "kiosk-operator:" in stderr and "additional properties 'replicas' not allowed" in stderr
    assert "global" not in stderr
    assert not render(tmp_path, {"kiosk-operator": {"enabled": False}}, chart=umbrella)  # the condition
    lint = helm("lint", "--strict", "--with-subcharts", str(umbrella), "--kube-version", KUBE_VERSION)
    assert "2 chart(s) linted, 0 chart(s) failed" in lint.stdout  # the umbrella and this chart


@pytest.mark.cluster
def test_umbrella_chart_installs(umbrella: Path, crds: LocalCluster, k8s_namespace: str) -> None:  # noqa: F811
    ns = k8s_namespace
    helm("install", "platform", str(umbrella), "--namespace", ns, "--wait", "--timeout", "120s",
         "--set", "global.imagePullPolicy=Always", kubeconfig=crds.kubeconfig)
    try:
        deployment = crds.kubectl_json("get", "deployment", "platform-kiosk-operator", "-n", ns)
        assert COMMON_LABELS.items() <= deployment["metadata"]["labels"].items()
        status = json.loads(helm("status", "platform", "-n", ns, "-o", "json", kubeconfig=crds.kubeconfig).stdout)
        assert status["info"]["status"] == "deployed"
    finally:
        helm("uninstall", "platform", "--namespace", ns, "--wait", kubeconfig=crds.kubeconfig)


# --- crds.install on a control plane of its own -------------------------------------------------


@pytest.fixture(scope="module")
def own_cluster() -> Iterator[LocalCluster]:
    """A cluster whose ConsumerPool CRD these tests may hand to a release and change."""
    cluster = LocalCluster(nodes=0)
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()


def changed_chart(tmp: Path) -> Path:
    """A copy of the chart (links resolved) whose CRD has one more field and printer column."""
    copy_dir = tmp / "changed-chart"
    shutil.copytree(CHART, copy_dir, symlinks=False)
    path = copy_dir / "crds" / "consumerpool.yaml"
    crd = yaml.safe_load(path.read_text())
    version = crd["spec"]["versions"][0]
    version["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]["upgradeMarker"] = {
        "type": "string", "description": "Added by the chart upgrade test."}
    version["additionalPrinterColumns"].append(
        {"name": "Marker", "type": "string", "jsonPath": ".spec.upgradeMarker", "priority": 1})
    path.write_text(yaml.safe_dump(crd, sort_keys=False))
    return copy_dir


@pytest.mark.cluster
def test_crds_install_takes_over_upgrades_and_keeps_the_crd(own_cluster: LocalCluster, tmp_path: Path) -> None:
    cluster, kubeconfig = own_cluster, own_cluster.kubeconfig
    for ns in ("kiosk-a", "kiosk-b"):
        cluster.create_namespace(ns)
    on = ["--set", "crds.install=true", "--set", "commonLabels.team=imaging"]

    def live_crd() -> dict[str, Any]:
        return cluster.kubectl_json("get", "crd", CRD_NAME)

    # Without --skip-crds, Helm creates the CRD from crds/ first; the chart stops with the fix.
    failed = helm("install", "kiosk", str(CHART), "-n", "kiosk-a", *on, kubeconfig=kubeconfig, check=False)
    assert failed.returncode != 0
    assert "already exists and no Helm release manages it" in failed.stderr, failed.stderr
    (commands,) = re.findall(r"(kubectl label crd .*? --overwrite && kubectl annotate crd .*? --overwrite)",
                             failed.stderr)
    assert "meta.helm.sh/release-name" not in live_crd()["metadata"].get("annotations", {})
    handed = subprocess.run(["bash", "-c", commands], capture_output=True, text=True, timeout=60,
                            env={**os.environ, "PATH": f"{kubectl_dir(tmp_path)}:{os.environ['PATH']}",
                                 "KUBECONFIG": str(kubeconfig)})
    assert handed.returncode == 0, handed.stderr

    # With --skip-crds the release takes the CRD over.
    helm("install", "kiosk", str(CHART), "-n", "kiosk-a", "--skip-crds", *on, kubeconfig=kubeconfig)
    crd = live_crd()
    assert crd["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    assert crd["metadata"]["annotations"]["meta.helm.sh/release-name"] == "kiosk"
    assert crd["metadata"]["labels"]["team"] == "imaging"
    spec_props = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
    assert "upgradeMarker" not in spec_props

    # helm upgrade changes the CRD on the cluster (Helm's crds/ folder never would).
    generation = crd["metadata"]["generation"]
    helm("upgrade", "kiosk", str(changed_chart(tmp_path)), "-n", "kiosk-a", *on, kubeconfig=kubeconfig)
    crd = live_crd()
    assert crd["metadata"]["generation"] > generation
    spec_props = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
    assert spec_props["upgradeMarker"]["description"] == "Added by the chart upgrade test."
    assert "Marker" in [c["name"] for c in crd["spec"]["versions"][0]["additionalPrinterColumns"]]
    pool = {"apiVersion": "kiosk.deepcell.org/v1alpha1", "kind": "ConsumerPool",
            "metadata": {"name": "marked", "namespace": "kiosk-a"},
            "spec": {"queues": ["q"], "worker": {"image": "w"}, "upgradeMarker": "yes"}}

    def accepted_with_new_field() -> bool:
        result = cluster.kubectl("apply", "--dry-run=server", "--validate=strict", "-f", "-",
                                 input=json.dumps(pool), check=False)
        return result.returncode == 0

    wait_for(accepted_with_new_field, 30, "the API server serving the upgraded schema")

    # A second release cannot take the CRD from the first.
    other = helm("install", "other", str(CHART), "-n", "kiosk-b", "--skip-crds", *on, kubeconfig=kubeconfig,
                 check=False)
    assert other.returncode != 0
    assert 'belongs to Helm release "kiosk" in namespace "kiosk-a"' in other.stderr, other.stderr

    # helm uninstall keeps it: deleting the CRD would delete every pool.
    helm("uninstall", "kiosk", "-n", "kiosk-a", "--wait", kubeconfig=kubeconfig)
    crd = live_crd()
    assert "deletionTimestamp" not in crd["metadata"]
    assert "upgradeMarker" in crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"][
        "properties"]


# --- documentation: chart README, README values and metrics -------------------------------------


def _values_paths(values: Any, prefix: str = "") -> set[str]:
    paths: set[str] = set()
    if isinstance(values, dict):
        for key, value in values.items():
            here = f"{prefix}.{key}" if prefix else key
            paths |= {here} | _values_paths(value, here)
    return paths


def test_documented_values_exist() -> None:
    """Every value the chart README or the README's install section names is a value of the chart."""
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    known = _values_paths(values) | {"enabled"}
    top = set(values) | {"enabled"}
    chart_readme = (CHART / "README.md").read_text()
    readme = (ROOT / "README.md").read_text()
    install = readme.split("## Installing on Kubernetes", 1)[1].split("\n## ", 1)[0]
    named = set()
    for text in (chart_readme, install):
        for token in re.findall(r"`([^`\s]+)`", text) + re.findall(r"--set(?:-string)? ([^=\s]+)=", text):
            path = token.split("=", 1)[0].removeprefix("--set ").strip("'")
            if path.split(".")[0] in top and re.fullmatch(r"[A-Za-z][A-Za-z0-9.]*", path):
                named.add(path)
    assert {"crds.install", "commonLabels", "extraObjects", "metrics.podMonitor.enabled"} <= named, named
    assert named <= known, sorted(named - known)
    assert not REPOSITORY_PATH.search(chart_readme), "the packaged chart's README points at a checkout"
    assert not REPOSITORY_PATH.search(helm("show", "values", str(CHART)).stdout), "so do its values"


def _series(registry: Any) -> set[str]:
    """Names a PromQL query can use for the metrics of ``registry``."""
    suffixes = {"counter": ("_total",), "gauge": ("",), "histogram": ("_bucket", "_sum", "_count")}
    return {family.name + suffix for family in registry.collect() for suffix in suffixes.get(family.type, ())}


def test_readme_metrics_queries_use_real_series() -> None:
    from kiosk_operator.metrics import REGISTRY
    from kiosk_worker.metrics import PrometheusMetrics

    worker = PrometheusMetrics(0, addr="127.0.0.1")
    try:
        known = _series(REGISTRY) | _series(worker.registry)
    finally:
        worker.close()
    assert {"kiosk_pool_queue_pending", "kiosk_worker_jobs_total", "kiosk_worker_job_duration_seconds_bucket"} <= known
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Metrics", 1)[1].split("\n## ", 1)[0]
    used = set(re.findall(r"\bkiosk_[a-z_]+\b", section))
    assert len(used) >= 10, used
    assert used <= known, sorted(used - known)
    for kind in ("operator", "worker"):
        assert any(name.startswith(f"kiosk_{'pool' if kind == 'operator' else 'worker'}_") for name in used), kind


# --- the admin policy ---------------------------------------------------------------------------


def test_policy_reaches_the_operator_and_the_admission_policy(tmp_path: Path) -> None:
    from kiosk_operator import policy

    values = {"policy": {"allowedImagePrefixes": ["registry.example.com/kiosk/"], "allowEnvFrom": True}}
    docs = render(tmp_path, values, namespace="team-a")
    env = {e["name"]: e.get("value") for e in operator_container(docs)["env"]}
    pol = policy.load_policy({policy.POLICY_ENV: env[policy.POLICY_ENV]})
    assert pol.allowed_image_prefixes == ("registry.example.com/kiosk/",) and pol.allow_env_from
    assert not pol.allow_value_from and pol.configured
    (vap,) = by_kind(docs)["ValidatingAdmissionPolicy"]
    expressions = " ".join(v["expression"] for v in vap["spec"]["validations"])
    assert "'registry.example.com/kiosk/'" in expressions and "envFrom" not in expressions
    (binding,) = by_kind(docs)["ValidatingAdmissionPolicyBinding"]
    assert binding["spec"]["policyName"] == vap["metadata"]["name"]
    assert binding["spec"]["validationActions"] == ["Deny"]
    (match,) = binding["spec"]["matchResources"]["namespaceSelector"]["matchExpressions"]
    assert match["values"] == ["team-a"]
    # Default: the operator's policy is the one the chart documents.
    default_env = {e["name"]: e.get("value") for e in operator_container(render(tmp_path))["env"]}
    assert policy.load_policy({policy.POLICY_ENV: default_env[policy.POLICY_ENV]}) == policy.Policy()
    assert "ValidatingAdmissionPolicy" not in by_kind(render(tmp_path, {"admissionPolicy": {"enabled": False}}))
    old = helm("template", "kiosk", str(CHART), "--kube-version", "1.29.0").stdout
    assert "kind: ValidatingAdmissionPolicy" not in old and "KIOSK_POLICY" in old  # the operator still checks


def test_cluster_wide_admission_refuses_system_namespaces_and_its_own(tmp_path: Path) -> None:
    docs = render(tmp_path, VARIANTS["cluster-wide"], namespace="kiosk")
    (vap,) = by_kind(docs)["ValidatingAdmissionPolicy"]
    first = vap["spec"]["validations"][0]["expression"]
    for ns in ("kube-system", "kube-public", "kube-node-lease", "kiosk"):
        assert f"'{ns}'" in first
    (binding,) = by_kind(docs)["ValidatingAdmissionPolicyBinding"]
    assert "matchResources" not in binding["spec"]  # every namespace
    namespaced = by_kind(render(tmp_path, namespace="kiosk"))["ValidatingAdmissionPolicy"][0]
    assert "'kiosk'" not in namespaced["spec"]["validations"][0]["expression"]


def test_priority_classes_and_pull_secrets_reach_both_enforcement_points(tmp_path: Path) -> None:
    """Refused by default in CEL; listed names appear in CEL and KIOSK_POLICY; "*" drops the rule."""
    from kiosk_operator import policy

    def rules(values: dict[str, Any]) -> tuple[str, policy.Policy]:
        docs = render(tmp_path, values, namespace="team-a")
        env = {e["name"]: e.get("value") for e in operator_container(docs)["env"]}
        (vap,) = by_kind(docs)["ValidatingAdmissionPolicy"]
        text = " ".join(v["expression"] for v in vap["spec"]["validations"])
        return text, policy.load_policy({policy.POLICY_ENV: env[policy.POLICY_ENV]})

    default, pol = rules({})
    assert "priorityClassName in ['']" in default and "s.name in []" in default
    assert pol.allowed_priority_classes == () and pol.allowed_image_pull_secrets == ()
    listed, pol = rules({"policy": {"allowedPriorityClasses": ["batch-low"], "allowedImagePullSecrets": ["regcred"]}})
    assert "priorityClassName in ['','batch-low']" in listed and "s.name in ['regcred']" in listed
    assert pol.allowed_priority_classes == ("batch-low",) and pol.allowed_image_pull_secrets == ("regcred",)
    anything, _ = rules({"policy": {"allowedPriorityClasses": ["*"], "allowedImagePullSecrets": ["*"]}})
    assert "priorityClassName" not in anything and "imagePullSecrets" not in anything
    stderr = template_fails("--set", "policy.allowedPriorityClasses=high")
    assert "/policy/allowedPriorityClasses': got string, want array" in stderr, stderr


def test_chart_renders_without_kube_version() -> None:
    """What a user types first: `helm template` / `helm lint` with no --kube-version and no cluster."""
    rendered = helm("template", "kiosk", str(CHART), check=False)
    assert rendered.returncode == 0, rendered.stderr
    assert "kind: Deployment" in rendered.stdout
    lint = helm("lint", "--strict", str(CHART), check=False)
    assert lint.returncode == 0, lint.stdout + lint.stderr
