"""Real components for the tests: redis-server, model server, S3/GCS servers, a Kubernetes control plane.

An installed package (tests/pyproject.toml, `make venv`: ``pip install --no-deps -e tests``), so
tests, bench/ and tools/ import it as ``harness`` without path edits.

- ``cluster``: LocalCluster, the local control plane (``python -m harness.cluster up|down``);
  ``cluster_fixtures``: its pytest fixtures; ``kubelet``: KubeletPlayer, pods as local processes.
- ``operator_process``, ``operator_fixtures``: the operator as its ServiceAccount, pool manifests;
  ``rbac``: the RBAC objects built from the operator's rbac_rules.yaml; ``local_pool``: local mode.
- ``redis_server``, ``redis_fault_proxy``, ``storage_servers``: Redis (TLS, Sentinel), S3/GCS emulators.
- ``cluster.realnode``: the real kubelet + containerd node; ``images``: our images built with buildah;
  ``realnode_e2e``: the real-node e2e setup (chart, Redis and GCS on the node's host address).
- ``keda``: KEDA's operator and metrics adapter as local processes (bench only; needs
  tools/keda/build.sh); ``cluster.aggregation``: front-proxy PKI for the aggregation layer.
- ``procs`` (stop_process), ``wait`` (wait_for), ``ports`` (free_port).
"""
