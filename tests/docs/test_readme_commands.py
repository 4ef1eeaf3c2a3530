"""The README's commands, run as written against real servers, so the README cannot drift.

Each test takes its commands out of README.md itself (fenced blocks or inline code) and runs
them through bash, substituting only placeholders (`<registry>`, `<name>:<uuid>`), the ports
and paths of the test servers, and a unique namespace for `kiosk`. Commands that cannot run
here are checked for consistency instead (`docker build`: no Docker engine; the images are
covered by tests/packaging).

Covered elsewhere: `make test` runs this suite (and `make lint`); the chart's `--set` options
and the schema error message: tests/helm/test_chart.py; the custom-consumer example's
`pip install` and `CONSUMER_TYPE=thresholder kiosk-worker`: tests/worker/test_custom_consumer.py;
`--field`, exit codes and one-line errors of `kiosk`: tests/cli/test_cli.py.
"""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
import uuid
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
import tifffile

import kiosk_protocol as protocol
from harness.cluster import ClusterError, LocalCluster, binary_path
from harness.procs import stop_process
from harness.wait import wait_for
from kiosk_protocol.settings import ENV_NAMES

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()
VENV_BIN = Path(sys.executable).parent
REGISTRY = "registry.example.com/kiosk"


# --- reading the README ------------------------------------------------------------------------


def fenced_blocks(text: str) -> list[tuple[str, str]]:
    """(language, body) of every ``` fenced block, in order."""
    return [(m.group(1), m.group(2)) for m in re.finditer(r"^```(\w*)\n(.*?)^```", text, re.M | re.S)]


def commands(body: str) -> list[str]:
    """Shell commands of a block: backslash continuations joined, blank lines dropped."""
    joined = re.sub(r"\\\n\s*", " ", body)
    return [line.strip() for line in joined.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def block_starting(prefix: str) -> list[str]:
    """The commands of the one fenced block whose first command starts with ``prefix``."""
    found = [cmds for _, body in fenced_blocks(README) if (cmds := commands(body)) and cmds[0].startswith(prefix)]
    assert len(found) == 1, f"README should have exactly one code block starting with {prefix!r}, found {len(found)}"
    return found[0]


def inline_command(prefix: str) -> str:
    """The one inline `code` span of the README that starts with ``prefix``."""
    found = [m for m in re.findall(r"`([^`\n]+)`", README) if m.startswith(prefix)]
    assert len(found) == 1, f"README should show `{prefix}...` exactly once, found {found}"
    return found[0]


def substitute(command: str, old: str, new: str) -> str:
    """Replace a placeholder, failing loudly if the README no longer contains it."""
    assert old in command, f"expected {old!r} in the README command {command!r}"
    return command.replace(old, new)


# --- running commands --------------------------------------------------------------------------


def clean_env(path_dirs: Sequence[Path] = (), **extra: str) -> dict[str, str]:
    """This environment without any worker/CLI setting, Kubernetes or Helm variable."""
    drop = set(ENV_NAMES) | {"KUBECONFIG", "HOSTNAME", "KIOSK_USE_RUNNING_CLUSTER"}
    env = {k: v for k, v in os.environ.items() if k not in drop and not k.startswith(("HELM_", "STORAGE_"))}
    env["PATH"] = os.pathsep.join([*map(str, path_dirs), str(VENV_BIN), env.get("PATH", "/usr/bin:/bin")])
    env.update(COLUMNS="200", **extra)
    return env


def sh(script: str, *, cwd: Path, env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run README lines in bash, the way a user pastes them."""
    return subprocess.run(["bash", "-c", script], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def ok(proc: subprocess.CompletedProcess[str], what: str) -> str:
    assert proc.returncode == 0, f"{what} exited {proc.returncode}:\n{proc.stderr[-3000:]}\n{proc.stdout[-3000:]}"
    return proc.stdout


def tool_dir(tmp_path: Path, *names: str) -> Path:
    """A directory with the cached cluster binaries under their plain names (helm, kubectl)."""
    bindir = tmp_path / "tools-bin"
    bindir.mkdir(exist_ok=True)
    for name in names:
        (bindir / name).symlink_to(binary_path(name))
    return bindir


# --- the README itself -------------------------------------------------------------------------


def test_every_make_target_the_readme_names_exists() -> None:
    named = set(re.findall(r"\bmake (?:-s )?([a-z][a-z-]*)", README))
    assert {"demo", "test", "bench", "cluster-up", "cluster-down", "lint"} <= named
    targets = set(re.findall(r"^([a-z][a-z-]*):", (ROOT / "Makefile").read_text(), re.M))
    assert named <= targets, f"README names make targets the Makefile lacks: {sorted(named - targets)}"


def test_docker_build_lines_match_the_project() -> None:
    """Not runnable here (no Docker engine; tests/packaging builds each image's venv instead)."""
    lines = block_starting("docker build")
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert len(lines) == 2
    for line, image in zip(lines, ("kiosk-worker", "kiosk-operator"), strict=True):
        m = re.fullmatch(r"docker build -f (\S+)\s+-t <registry>/(\S+):(\S+) \.", line)
        assert m, f"unexpected docker build line: {line}"
        dockerfile, name, tag = m.groups()
        assert (ROOT / dockerfile).is_file() and name == image and tag == version
        entrypoint = re.search(r"^ENTRYPOINT (.+)$", (ROOT / dockerfile).read_text(), re.M)
        assert entrypoint and image in entrypoint.group(1), f"{dockerfile} should run {image}"
    helm_tag = re.search(r"--set image\.tag=(\S+)", " ".join(block_starting("helm install"))).group(1)
    assert helm_tag == version


def test_custom_consumer_snippets_match_the_worker() -> None:
    from kiosk_worker.consumers import ENTRY_POINT_GROUP
    from kiosk_worker.consumers.base import TensorFlowServingConsumer

    [python] = [body for lang, body in fenced_blocks(README) if lang == "python"]
    tree = ast.parse(python)  # the snippet is valid Python as shown
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) for alias in node.names}
    assert imported == {"TensorFlowServingConsumer"} and hasattr(TensorFlowServingConsumer, "_consume")
    used = {node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name) and node.value.id == "self"}
    source = "\n".join(Path(sys.modules[c.__module__].__file__).read_text()
                       for c in TensorFlowServingConsumer.__mro__ if c.__module__.startswith("kiosk_worker"))
    missing = [name for name in used if not re.search(rf"(self\.{name}\b|def {name}\b)", source)]
    assert not missing, f"the README's consumer uses attributes the base classes lack: {missing}"

    [toml] = [body for lang, body in fenced_blocks(README) if lang == "toml"]
    groups = tomllib.loads(toml)["project"]["entry-points"]
    assert list(groups) == [ENTRY_POINT_GROUP]


# --- the `kiosk` CLI block ---------------------------------------------------------------------


@pytest.fixture()
def model_server() -> Iterator[int]:
    from kiosk_model_server import ModelServer

    server = ModelServer(models=["segmentation"]).start()
    yield server.port
    server.stop(grace=0)


def test_kiosk_cli_block(redis_server, redis_client, model_server: int, tmp_path: Path) -> None:
    from kiosk_model_server.synthetic import make_cells

    export, submit_dir, submit_zip, status, results = block_starting("export REDIS_HOST")
    bucket = tmp_path / "kiosk-bucket"
    export = substitute(export, "REDIS_PORT=6379", f"REDIS_PORT={redis_server.port}")
    export = substitute(export, "file:///tmp/kiosk-bucket", f"file://{bucket}")
    assert export.startswith("export REDIS_HOST=127.0.0.1 ")

    work = tmp_path / "work"
    (work / "images").mkdir(parents=True)
    for i in range(2):
        image, _ = make_cells((64, 64), n_cells=4, seed=i)
        tifffile.imwrite(work / "images" / f"cells-{i}.tif", image)
    with zipfile.ZipFile(work / "batch.zip", "w") as zf:
        zf.write(work / "images" / "cells-0.tif", "cells-0.tif")

    env = clean_env(KUBECONFIG=str(tmp_path / "no-kubeconfig"))
    worker_env = {**env, **redis_server.env(), "STORAGE_BUCKET": f"file://{bucket}", "QUEUE": "segmentation",
                  "CONSUMER_TYPE": "segmentation", "TF_HOST": "127.0.0.1", "TF_PORT": str(model_server),
                  "WORKER_NAME": "readme-worker", "HEARTBEAT_INTERVAL": "0.5", "EMPTY_QUEUE_TIMEOUT": "0.5"}
    log = tmp_path / "worker.log"
    with open(log, "wb") as out:
        worker = subprocess.Popen([str(VENV_BIN / "kiosk-worker")], env=worker_env, cwd=tmp_path,
                                  stdout=out, stderr=subprocess.STDOUT)
    try:
        def run(line: str) -> str:
            assert worker.poll() is None, f"kiosk-worker exited:\n{log.read_text()[-3000:]}"
            return ok(sh(f"{export}\n{line}", cwd=work, env=env, timeout=90), line)

        out = run(submit_dir)
        assert "2 jobs done" in out
        assert sorted(p.suffix for p in (work / "results").iterdir()) == [".zip", ".zip"]

        out = run(submit_zip)
        [zip_key] = out.split()
        assert re.fullmatch(r"segmentation-zip:\w+-batch\.zip:[\w-]+", zip_key), zip_key  # "goes to segmentation-zip"
        assert redis_client.lrange("segmentation-zip", 0, -1) == [zip_key]

        out = run(status)
        assert re.search(r"│ segmentation-zip\s*│\s*1\s*│\s*0\s*│", out), f"no pending zip job shown:\n{out}"
        assert "readme-worker" in out

        done = sorted(k for k in redis_client.keys("segmentation:*cells-*") if redis_client.hget(k, "status") == "done")
        assert len(done) == 2
        _, name, job_uuid = done[0].split(":")
        line = substitute(substitute(results, "<name>", name), "<uuid>", job_uuid)
        shutil.rmtree(work / "results")
        out = run(line)
        assert done[0] in out and protocol.DONE in out
        assert [p.suffix for p in (work / "results").iterdir()] == [".zip"]
    finally:
        stop_process(worker, 30)


# --- installing on Kubernetes ------------------------------------------------------------------


@pytest.mark.cluster
def test_helm_block_installs_applies_and_upgrades(k8s_cluster: LocalCluster, tmp_path: Path) -> None:
    install, rollout, apply, get = block_starting("helm install")
    ns = f"readme-{uuid.uuid4().hex[:6]}"

    def in_namespace(command: str) -> str:
        out = re.sub(r"(--namespace|-n) kiosk(?=\s|$)", rf"\1 {ns}", command)
        assert out != command, f"no `-n kiosk` in {command!r}"
        return out

    install = substitute(in_namespace(install), "<registry>", REGISTRY)
    get = substitute(in_namespace(get), " -w ", " ")  # watching never ends
    columns = re.search(r"#\s*(.+)$", get).group(1).split(" / ")  # the README names the columns
    upgrade = substitute(in_namespace(inline_command("helm upgrade ")), "--set ...", "--set operator.verbose=true")
    explain = inline_command("kubectl explain ")
    apply_crd = inline_command("kubectl apply -f crds/")

    helm_home = tmp_path / "helm"
    env = clean_env([tool_dir(tmp_path, "helm", "kubectl")], KUBECONFIG=str(k8s_cluster.kubeconfig),
                    HELM_CACHE_HOME=str(helm_home / "cache"), HELM_CONFIG_HOME=str(helm_home / "config"),
                    HELM_DATA_HOME=str(helm_home / "data"))
    try:
        ok(sh(install, cwd=ROOT, env=env, timeout=120), install)
        deployment = k8s_cluster.kubectl_json("get", "deployment", "kiosk-operator", "-n", ns)
        [container] = deployment["spec"]["template"]["spec"]["containers"]
        assert container["image"] == f"{REGISTRY}/kiosk-operator:0.1.0"

        out = ok(sh(in_namespace(rollout), cwd=ROOT, env=env, timeout=90), rollout)
        assert "successfully rolled out" in out

        out = ok(sh(in_namespace(apply), cwd=ROOT, env=env), apply)
        assert "consumerpool.kiosk.deepcell.org/segmentation created" in out

        out = ok(sh(get, cwd=ROOT, env=env), get)
        header, *rows = out.splitlines()
        assert header.split()[:1 + len(columns)] == ["NAME", *(c.upper() for c in columns)], header
        assert [r.split()[0] for r in rows] == ["segmentation"]
        uid = k8s_cluster.kubectl_json("get", "consumerpool", "segmentation", "-n", ns)["metadata"]["uid"]

        ok(sh(upgrade, cwd=ROOT, env=env, timeout=120), upgrade)
        deployment = k8s_cluster.kubectl_json("get", "deployment", "kiosk-operator", "-n", ns)
        [container] = deployment["spec"]["template"]["spec"]["containers"]
        assert "--verbose" in container["args"]
        assert container["image"] == f"{REGISTRY}/kiosk-operator:0.1.0"  # --reuse-values kept the image
        assert k8s_cluster.kubectl_json("get", "consumerpool", "segmentation", "-n", ns)["metadata"]["uid"] == uid

        ok(sh(apply_crd, cwd=ROOT, env=env), apply_crd)
        out = ok(sh(explain, cwd=ROOT, env=env), explain)
        crd = json.loads(k8s_cluster.kubectl("get", "crd", "consumerpools.kiosk.deepcell.org", "-o", "json").stdout)
        queues_doc = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"][
            "properties"]["queues"]["description"]
        assert " ".join(queues_doc.split()[:8]) in " ".join(out.split())
    finally:
        sh(f"helm uninstall kiosk-operator -n {ns} --wait --timeout 60s", cwd=ROOT, env=env, timeout=90)
        try:
            k8s_cluster.delete_namespace(ns)
        except ClusterError:
            pass


# --- make cluster-up / cluster-down ------------------------------------------------------------


@pytest.mark.cluster
def test_make_cluster_up_and_down(tmp_path: Path) -> None:
    """In a private KIOSK_CACHE (sharing only the built binaries) so the session cluster is untouched."""
    up = inline_command("eval \"$(make -s cluster-up")
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "bin").symlink_to(binary_path("kubectl").parent)
    env = clean_env([tool_dir(tmp_path, "kubectl")], KIOSK_CACHE=str(cache))
    state = cache / "cluster-state.json"
    try:
        out = ok(sh(f'{up}\necho "KUBECONFIG=$KUBECONFIG"\nkubectl get nodes -o name', cwd=ROOT, env=env,
                    timeout=120), up)
        assert f"KUBECONFIG={cache}/" in out, out
        assert len([line for line in out.splitlines() if line.startswith("node/")]) == 3, out
        pids = json.loads(state.read_text())["pids"].values()
    finally:
        ok(sh("make cluster-down", cwd=ROOT, env=env, timeout=60), "make cluster-down")
    assert not state.exists()

    wait_for(lambda: not any(map(_running, pids)), 30, "the cluster's processes to exit")


def _running(pid: int) -> bool:
    try:
        return "zombie" not in Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False


# --- make demo ---------------------------------------------------------------------------------


def test_make_demo() -> None:
    """As a user runs it, from the repo root (state in .kiosk-local/, ports from consumerpool-local.yaml)."""
    [demo, _test] = block_starting("make demo")  # `make test` is what runs this suite
    out = ok(sh(demo, cwd=ROOT, env=clean_env(), timeout=120), demo)
    m = re.search(r"(\d+)/(\d+) jobs done", out)
    assert m and m.group(1) == m.group(2), out[-2000:]
