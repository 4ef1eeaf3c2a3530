"""The API aggregation layer for a LocalCluster: front-proxy PKI and the API server's flags.

An aggregated API (for example ``external.metrics.k8s.io``, served by KEDA's metrics adapter)
is reached through kube-apiserver, which proxies the request with the caller's identity in
``X-Remote-*`` headers and authenticates itself with a *front-proxy client* certificate. The
extension server trusts those headers only from a certificate signed by the
``--requestheader-client-ca-file`` CA with one of the ``--requestheader-allowed-names``.

This module keeps that PKI apart from the cluster's own (a separate CA, as kubeadm does), so
it can be written before ``LocalCluster.start()`` and passed as ``extra_apiserver_args``::

    agg = FrontProxy(tmpdir).write()
    cluster = LocalCluster(extra_apiserver_args=agg.apiserver_args())
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from .errors import ClusterStartError

FRONT_PROXY_CLIENT_CN = "front-proxy-client"
_EC = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]


def _openssl(*args: str, cwd: Path) -> None:
    proc = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise ClusterStartError(f"openssl {' '.join(args)} failed:\n{proc.stderr}")


def write_ca(directory: Path, name: str, subject: str) -> None:
    """A self-signed CA ``<name>.crt``/``<name>.key`` in ``directory`` (kept if present)."""
    directory.mkdir(parents=True, exist_ok=True)
    if (directory / f"{name}.crt").exists():
        return
    _openssl("req", "-x509", "-new", *_EC, "-keyout", f"{name}.key", "-out", f"{name}.crt", "-days", "3650",
             "-subj", subject,
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign,digitalSignature", cwd=directory)
    (directory / f"{name}.key").chmod(0o600)


def write_signed_leaf(directory: Path, ca: str, name: str, subject: str, eku: str, san: str | None = None) -> None:
    """``<name>.crt``/``.key`` signed by CA ``<ca>.crt`` in ``directory`` (kept if present)."""
    if (directory / f"{name}.crt").exists():
        return
    ext = ["basicConstraints=critical,CA:FALSE", "keyUsage=critical,digitalSignature,keyEncipherment",
           f"extendedKeyUsage={eku}"]
    if san:
        ext.append(f"subjectAltName={san}")
    (directory / f"{name}.ext").write_text("\n".join(ext) + "\n")
    _openssl("req", "-new", *_EC, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", subject, cwd=directory)
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.crt", "-CAkey", f"{ca}.key",
             "-CAcreateserial", "-out", f"{name}.crt", "-days", "3650", "-extfile", f"{name}.ext", cwd=directory)
    (directory / f"{name}.key").chmod(0o600)


class FrontProxy:
    """Front-proxy CA + client certificate in ``directory``, and the API server flags using them."""

    def __init__(self, directory: Path | str) -> None:
        self.dir = Path(directory)

    @property
    def ca_file(self) -> Path:
        """The CA an extension server must trust for the ``X-Remote-*`` headers."""
        return self.dir / "front-proxy-ca.crt"

    def write(self) -> FrontProxy:
        write_ca(self.dir, "front-proxy-ca", "/CN=kiosk-front-proxy-ca")
        write_signed_leaf(self.dir, "front-proxy-ca", "front-proxy-client", f"/CN={FRONT_PROXY_CLIENT_CN}",
                          "clientAuth")
        return self

    def apiserver_args(self) -> list[str]:
        """kube-apiserver flags that enable request-header authentication towards aggregated APIs."""
        return [
            f"--requestheader-client-ca-file={self.ca_file}",
            f"--requestheader-allowed-names={FRONT_PROXY_CLIENT_CN}",
            "--requestheader-username-headers=X-Remote-User",
            "--requestheader-group-headers=X-Remote-Group",
            "--requestheader-extra-headers-prefix=X-Remote-Extra-",
            f"--proxy-client-cert-file={self.dir / 'front-proxy-client.crt'}",
            f"--proxy-client-key-file={self.dir / 'front-proxy-client.key'}",
        ]
