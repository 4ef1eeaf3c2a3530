"""A real local Kubernetes control plane for tests (no mocks).

Processes, all on 127.0.0.1 with free ports, binaries built from Go modules by
tools/cluster/build.sh into ``${KIOSK_CACHE:-~/.cache/kiosk-operator}/bin``:

    etcd -> kube-apiserver -> kube-controller-manager, kube-scheduler, kwok

kwok plays kubelet for fake nodes (see harness.cluster.kwok for what it does to pods);
``LocalCluster(real_node=True)`` (or ``start_real_node()`` on a ``real_node_capable`` cluster)
adds one real node: kubelet + containerd + kube-proxy in network namespace ``kiosk-node``
(``realnode``, ``netns``, ``containerd``, ``realnode_host``; pause image from tools/node/pause.c);
the controller-manager runs all controllers, so Deployments get ReplicaSets and pods,
Jobs complete, and deleting an owner garbage-collects its children.

Modules: ``binaries`` (build and cache paths), ``pki`` (certificates, kubeconfigs),
``control_plane`` (the processes), ``kwok`` (Stages in kwok-stages.yaml, nodes), ``api``
(KubeApi: the ``kubernetes`` client), ``local`` (LocalCluster), ``cli``.

Use from Python::

    with LocalCluster(nodes=3) as c:
        c.get("/api/v1/nodes")
        os.environ["KUBECONFIG"] = str(c.kubeconfig)

or the CLI (detached cluster, state in ``${KIOSK_CACHE}/cluster-state.json``)::

    python -m harness.cluster up      # or tools/cluster/cluster.py up, make cluster-up
    python -m harness.cluster down
"""

from .api import KubeApi
from .binaries import (
    ALL_BINARIES,
    CLUSTER_BINARIES,
    binary_path,
    binary_versions,
    cache_dir,
    ensure_binaries,
    state_file,
)
from .cli import main
from .errors import ApiError, ApiUnreachable, ClusterError, ClusterStartError
from .kwok import HARNESS_KUBELET_LABEL, KWOK_NODE_ANNOTATION, POD_COMPLETE_DELAY_ANNOTATION, POD_FAIL_ANNOTATION
from .local import LocalCluster
from .netns import HOST_IP, NODE_IP, POD_CIDR, NodeUnsupported
from .realnode import NODE_NAME, NODE_SELECTOR, TAINT, TOLERATION, RealNode

__all__ = [
    "ALL_BINARIES", "CLUSTER_BINARIES", "HARNESS_KUBELET_LABEL", "HOST_IP", "KWOK_NODE_ANNOTATION",
    "NODE_IP", "NODE_NAME", "NODE_SELECTOR", "POD_CIDR", "TAINT", "TOLERATION", "NodeUnsupported", "RealNode",
    "POD_COMPLETE_DELAY_ANNOTATION", "POD_FAIL_ANNOTATION", "ApiError", "ApiUnreachable", "ClusterError",
    "ClusterStartError", "KubeApi", "LocalCluster", "binary_path", "binary_versions", "cache_dir",
    "ensure_binaries", "main", "state_file",
]
