"""Certificates (openssl) and kubeconfigs for the local control plane.

One CA signs the API server's serving certificate and a client certificate per user:
``admin`` (system:masters), the controller-manager, the scheduler and kwok. ``sa.key``
signs ServiceAccount tokens.
"""

from __future__ import annotations

import base64
import json
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .errors import ClusterStartError

_EC = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
_APISERVER_SANS = ",".join([
    "DNS:localhost", "DNS:kubernetes", "DNS:kubernetes.default", "DNS:kubernetes.default.svc",
    "DNS:kubernetes.default.svc.cluster.local", "IP:127.0.0.1", "IP:10.96.0.1",
    "IP:10.250.0.1",  # the host's address as seen from the real node (harness.cluster.netns.HOST_IP)
])
# name -> (subject, extended key usage, subjectAltName)
LEAVES: dict[str, tuple[str, str, str | None]] = {
    "apiserver": ("/CN=kube-apiserver", "serverAuth", _APISERVER_SANS),
    "admin": ("/O=system:masters/CN=kubernetes-admin", "clientAuth", None),
    "kcm": ("/CN=system:kube-controller-manager", "clientAuth", None),
    "scheduler": ("/CN=system:kube-scheduler", "clientAuth", None),
    "kwok": ("/O=system:masters/CN=kwok", "clientAuth", None),
    # The API server's identity towards kubelets (logs, exec, port-forward).
    "apiserver-kubelet-client": ("/O=system:masters/CN=kube-apiserver-kubelet-client", "clientAuth", None),
}


def _openssl(*args: str, cwd: Path) -> None:
    proc = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise ClusterStartError(f"openssl {' '.join(args)} failed:\n{proc.stderr}")


def b64file(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def write_pki(pki: Path) -> None:
    """CA, leaf certificates (LEAVES) and the ServiceAccount key pair in ``pki`` (kept if present)."""
    pki.mkdir(parents=True, exist_ok=True)
    if (pki / "admin.crt").exists():
        return
    _openssl("req", "-x509", "-new", *_EC, "-keyout", "ca.key", "-out", "ca.crt", "-days", "3650",
             "-subj", "/CN=kiosk-local-ca",
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign,digitalSignature", cwd=pki)
    for name, (subj, eku, san) in LEAVES.items():
        write_leaf(pki, name, subj, eku, san)
    _openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-out", "sa.key", cwd=pki)
    _openssl("pkey", "-in", "sa.key", "-pubout", "-out", "sa.pub", cwd=pki)
    for f in pki.glob("*.key"):
        f.chmod(0o600)


def write_leaf(pki: Path, name: str, subject: str, eku: str, san: str | None = None) -> None:
    """``<name>.crt``/``.key`` signed by the CA in ``pki`` (e.g. the real node's kubelet identities)."""
    ext = ["basicConstraints=critical,CA:FALSE",
           "keyUsage=critical,digitalSignature,keyEncipherment",
           f"extendedKeyUsage={eku}"]
    if san:
        ext.append(f"subjectAltName={san}")
    (pki / f"{name}.ext").write_text("\n".join(ext) + "\n")
    _openssl("req", "-new", *_EC, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", subject, cwd=pki)
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
             "-CAcreateserial", "-out", f"{name}.crt", "-days", "3650", "-extfile", f"{name}.ext", cwd=pki)
    (pki / f"{name}.key").chmod(0o600)


def client_cert_user(pki: Path, name: str, *, embed: bool) -> dict[str, str]:
    """A kubeconfig ``user`` authenticating with leaf certificate ``name`` (inline or by path)."""
    if embed:
        return {"client-certificate-data": b64file(pki / f"{name}.crt"),
                "client-key-data": b64file(pki / f"{name}.key")}
    return {"client-certificate": str(pki / f"{name}.crt"), "client-key": str(pki / f"{name}.key")}


def write_kubeconfig(path: Path, *, server: str, ca_file: Path, user: Mapping[str, Any], embed_ca: bool = False,
                     namespace: str | None = None, user_name: str = "admin") -> Path:
    """A one-context kubeconfig (JSON, which is valid kubeconfig YAML), mode 0600."""
    cluster: dict[str, Any] = {"server": server}
    if embed_ca:
        cluster["certificate-authority-data"] = b64file(ca_file)
    else:
        cluster["certificate-authority"] = str(ca_file)
    context: dict[str, Any] = {"cluster": "kiosk-local", "user": user_name}
    if namespace:
        context["namespace"] = namespace
    cfg = {
        "apiVersion": "v1", "kind": "Config", "preferences": {},
        "clusters": [{"name": "kiosk-local", "cluster": cluster}],
        "users": [{"name": user_name, "user": dict(user)}],
        "contexts": [{"name": "kiosk-local", "context": context}],
        "current-context": "kiosk-local",
    }
    path.write_text(json.dumps(cfg, indent=2) + "\n")
    path.chmod(0o600)
    return path
