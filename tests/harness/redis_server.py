"""A real redis-server on a loopback port, one per test session (or per test when asked).

Optionally TLS-only (certificates from a throwaway test CA made with the openssl CLI),
password-protected, or a replica of another RedisServer; ``RedisSentinel`` runs a real
Sentinel (``redis-server <conf> --sentinel``) monitoring one of them.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import redis

from harness.ports import free_port
from harness.procs import ServerProcess, stop_process
from harness.wait import WaitTimeout, wait_for

T = TypeVar("T")

LOCALHOST = "127.0.0.1"


def _redis_binary() -> str:
    binary = shutil.which("redis-server")
    if not binary:
        raise RuntimeError("redis-server not found: run `make deps` (apt-get install redis-server)")
    return binary


def _wait_up(proc: subprocess.Popen[bytes], probe: redis.Redis, log: Path, what: str) -> None:
    """Poll ``probe.ping()`` until it answers; raise with the log tail if the process dies."""
    def answers() -> bool:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited at start: {log.read_text()[-500:]}")
        return bool(probe.ping())

    try:
        wait_for(answers, 10, f"{what} to answer PING", interval=0.02, max_interval=0.1,
                 ignore=(redis.ConnectionError, redis.TimeoutError))
    except WaitTimeout:
        raise RuntimeError(f"{what} failed to start: {log.read_text()[-500:]}") from None
    finally:
        probe.close()


class TestCA:
    """A throwaway CA plus one certificate for 127.0.0.1/localhost (server and client use).

    Made with the openssl CLI (no extra Python dependency). ``client_cert``/``client_key``
    are a second leaf for mutual TLS.
    """

    __test__ = False  # not a pytest test class

    def __init__(self, directory: Path) -> None:
        openssl = shutil.which("openssl")
        if not openssl:
            raise RuntimeError("openssl not found: apt-get install openssl")
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.ca_file = self.dir / "ca.crt"
        self.ca_key = self.dir / "ca.key"
        self._run(openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                  "-nodes", "-keyout", self.ca_key, "-out", self.ca_file, "-days", "2",
                  "-subj", "/CN=kiosk test CA",
                  "-addext", "basicConstraints=critical,CA:TRUE",
                  "-addext", "keyUsage=critical,keyCertSign,cRLSign")
        self.cert_file, self.key_file = self._leaf(openssl, "server", "localhost")
        self.client_cert, self.client_key = self._leaf(openssl, "client", "kiosk-worker")

    def _leaf(self, openssl: str, name: str, cn: str) -> tuple[Path, Path]:
        key, csr, crt, ext = (self.dir / f"{name}.{s}" for s in ("key", "csr", "crt", "ext"))
        ext.write_text(
            "basicConstraints=critical,CA:FALSE\n"
            "keyUsage=critical,digitalSignature,keyEncipherment\n"
            "extendedKeyUsage=serverAuth,clientAuth\n"
            "subjectAltName=IP:127.0.0.1,DNS:localhost\n"
            "subjectKeyIdentifier=hash\n"
            "authorityKeyIdentifier=keyid\n"
        )
        self._run(openssl, "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                  "-keyout", key, "-out", csr, "-subj", f"/CN={cn}")
        self._run(openssl, "x509", "-req", "-in", csr, "-CA", self.ca_file, "-CAkey", self.ca_key,
                  "-CAcreateserial", "-out", crt, "-days", "2", "-extfile", ext)
        return crt, key

    @staticmethod
    def _run(*args: object) -> None:
        done = subprocess.run([str(a) for a in args], capture_output=True, text=True, check=False)
        if done.returncode:
            raise RuntimeError(f"openssl failed: {done.stderr.strip()[-500:]}")

    def server_args(self, auth_clients: bool = False) -> list[str]:
        """redis-server/sentinel options to serve (and replicate) over TLS with this CA."""
        return [
            "--tls-cert-file", str(self.cert_file), "--tls-key-file", str(self.key_file),
            "--tls-ca-cert-file", str(self.ca_file),
            "--tls-auth-clients", "yes" if auth_clients else "no",
            "--tls-replication", "yes",
        ]

    def client_kwargs(self, client_cert: bool = False) -> dict[str, object]:
        """redis-py options trusting this CA (and presenting the client certificate if asked)."""
        kwargs: dict[str, object] = {"ssl": True, "ssl_ca_certs": str(self.ca_file)}
        if client_cert:
            kwargs.update(ssl_certfile=str(self.client_cert), ssl_keyfile=str(self.client_key))
        return kwargs


class RedisServer(ServerProcess):
    """Start/stop/restart a redis-server process; data dir survives restarts (AOF optional).

    ``tls=True`` serves TLS only (no plain port; ``ca`` shares a CA between servers, else
    one is made in the server's dir); ``tls_auth_clients`` demands client certificates;
    ``password`` sets requirepass (and masterauth); ``replica_of`` makes it a replica.
    """

    def __init__(
        self,
        appendonly: bool = False,
        port: int | None = None,
        *,
        tls: bool = False,
        tls_auth_clients: bool = False,
        ca: TestCA | None = None,
        password: str = "",
        replica_of: RedisServer | None = None,
    ) -> None:
        self.binary = _redis_binary()
        self.port = port or free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="kiosk-redis-"))
        self.appendonly = appendonly
        self.tls = tls
        self.tls_auth_clients = tls_auth_clients
        self.ca = ca or (TestCA(self.dir / "tls") if tls else None)
        self.password = password
        self.replica_of = replica_of
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        scheme = "rediss" if self.tls else "redis"
        return f"{scheme}://127.0.0.1:{self.port}/0"

    @property
    def address(self) -> str:
        return f"{LOCALHOST}:{self.port}"

    def client_options(self) -> dict[str, object]:
        """redis-py options reaching this server (TLS with the test CA, password)."""
        options: dict[str, object] = {}
        if self.tls and self.ca:
            options.update(self.ca.client_kwargs(client_cert=self.tls_auth_clients))
        if self.password:
            options["password"] = self.password
        return options

    def client(self, **kwargs: object) -> redis.Redis:
        options: dict[str, object] = {"decode_responses": True, **self.client_options(), **kwargs}
        return redis.Redis(host=LOCALHOST, port=self.port, **options)  # type: ignore[arg-type]

    def args(self) -> list[str]:
        args = [
            self.binary, "--bind", LOCALHOST, "--dir", str(self.dir),
            "--save", "", "--appendonly", "yes" if self.appendonly else "no",
            "--appendfsync", "always", "--protected-mode", "no",
            "--repl-diskless-sync-delay", "0",  # replicas sync at once, not after 5 s
        ]
        if self.tls and self.ca:
            args += ["--port", "0", "--tls-port", str(self.port), *self.ca.server_args(self.tls_auth_clients)]
        else:
            args += ["--port", str(self.port)]
        if self.password:
            args += ["--requirepass", self.password, "--masterauth", self.password]
        if self.replica_of is not None:
            args += ["--replicaof", LOCALHOST, str(self.replica_of.port)]
        return args

    def start(self) -> RedisServer:
        log = open(self.dir / "redis.log", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(self.args(), stdout=log, stderr=subprocess.STDOUT)
        _wait_up(self.proc, self.client(socket_timeout=0.5), self.dir / "redis.log", "redis-server")
        if self.replica_of is not None and self.replica_of.proc is not None:
            # "online" on the master's side: after a diskless sync the master streams writes
            # only once the replica's first ACK arrives (up to a second later).
            wait_for(lambda: self.replica_of.replica_state(self.port) == "online", 10,
                     f"replica {self.port} online at its master", interval=0.02, max_interval=0.1)
        return self

    def replica_state(self, port: int) -> str:
        """This master's view of its replica on ``port`` ('online' when streaming), '' if unknown."""
        with self.client(socket_timeout=2) as c:
            info = c.info("replication")
        for key, value in info.items():
            if key.startswith("slave") and isinstance(value, dict) and int(value.get("port", 0)) == port:
                return str(value.get("state", ""))
        return ""

    def sync_replicas(self, timeout: float = 10.0) -> None:
        """Return once every replica has everything written so far (no write lost by a failover).

        A propagated PUBLISH marks our place in the replication stream; WAIT makes the
        replicas acknowledge up to it (the stream is ordered, so all earlier writes too).
        """
        with self.client(socket_timeout=timeout + 2) as c:
            replicas = int(c.info("replication")["connected_slaves"])
            c.publish("__kiosk_test_sync__", "")
            acked = c.wait(replicas, int(timeout * 1000))
        if acked < replicas:
            raise RuntimeError(f"only {acked} of {replicas} replicas caught up within {timeout}s")


    def role(self) -> str:
        """'master' or 'slave', as the server itself reports it now."""
        with self.client(socket_timeout=2) as c:
            return str(c.info("replication")["role"])

    def env(self) -> dict[str, str]:
        """Worker environment pointing at this server."""
        env = {"REDIS_HOST": LOCALHOST, "REDIS_PORT": str(self.port)}
        if self.tls and self.ca:
            env.update(REDIS_TLS="true", REDIS_TLS_CA_FILE=str(self.ca.ca_file))
            if self.tls_auth_clients:
                env.update(REDIS_TLS_CERT_FILE=str(self.ca.client_cert),
                           REDIS_TLS_KEY_FILE=str(self.ca.client_key))
        if self.password:
            env["REDIS_PASSWORD"] = self.password
        return env


class RedisSentinel:
    """A real Sentinel monitoring ``master`` under ``name`` (quorum 1, fast failure detection).

    It speaks TLS when the master does (same CA) and knows the master's password;
    ``password`` sets the Sentinel's own requirepass (None: the master's, as Bitnami does).
    """

    def __init__(
        self,
        master: RedisServer,
        name: str = "mymaster",
        *,
        port: int | None = None,
        password: str | None = None,
        down_after_ms: int = 1000,
        failover_timeout_ms: int = 5000,
    ) -> None:
        self.binary = _redis_binary()
        self.master = master
        self.name = name
        self.port = port or free_port()
        self.password = master.password if password is None else password
        self.down_after_ms = down_after_ms
        self.failover_timeout_ms = failover_timeout_ms
        self.dir = Path(tempfile.mkdtemp(prefix="kiosk-sentinel-"))
        self.conf = self.dir / "sentinel.conf"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"{LOCALHOST}:{self.port}"

    def client(self, **kwargs: object) -> redis.Redis:
        options: dict[str, object] = {"decode_responses": True, "socket_timeout": 2}
        if self.master.tls and self.master.ca:
            options.update(self.master.ca.client_kwargs(client_cert=self.master.tls_auth_clients))
        if self.password:
            options["password"] = self.password
        options.update(kwargs)
        return redis.Redis(host=LOCALHOST, port=self.port, **options)  # type: ignore[arg-type]

    def _write_conf(self) -> None:
        """Sentinel rewrites its config file, so it lives in our temp dir."""
        m = self.master
        lines = [f"bind {LOCALHOST}", "protected-mode no", f"dir {self.dir}"]
        if m.tls and m.ca:
            lines.append("port 0")
            lines.append(f"tls-port {self.port}")
            opts = m.ca.server_args(m.tls_auth_clients)
            lines += [f"{k.lstrip('-')} {v}" for k, v in zip(opts[::2], opts[1::2], strict=True)]
        else:
            lines.append(f"port {self.port}")
        if self.password:
            lines.append(f"requirepass {self.password}")
        lines += [
            f"sentinel monitor {self.name} {LOCALHOST} {m.port} 1",
            f"sentinel down-after-milliseconds {self.name} {self.down_after_ms}",
            f"sentinel failover-timeout {self.name} {self.failover_timeout_ms}",
        ]
        if m.password:
            lines.append(f"sentinel auth-pass {self.name} {m.password}")
        self.conf.write_text("\n".join(lines) + "\n")

    def start(self, replicas: int = 0, timeout: float = 10.0) -> RedisSentinel:
        """Start and wait until the master is seen up with ``replicas`` replicas."""
        self._write_conf()
        log = open(self.dir / "sentinel.log", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen([self.binary, str(self.conf), "--sentinel"], stdout=log,
                                     stderr=subprocess.STDOUT)
        _wait_up(self.proc, self.client(socket_timeout=0.5), self.dir / "sentinel.log", "redis sentinel")
        self._wait(lambda: self._healthy(replicas), timeout, f"sentinel to see master with {replicas} replicas")
        return self

    def _healthy(self, replicas: int) -> bool:
        """Master up, and ``replicas`` replicas whose own INFO Sentinel has read (promotable)."""
        with self.client() as c:
            state = c.sentinel_master(self.name)
            if not state["is_master"] or state["is_sdown"] or state["is_odown"]:
                return False
            good = [r for r in c.sentinel_slaves(self.name)
                    if not r["is_sdown"] and not r["is_disconnected"]
                    and r.get("master-link-status") == "ok"]
        return len(good) >= replicas

    def master_address(self) -> tuple[str, int]:
        with self.client() as c:
            host, port = c.sentinel_get_master_addr_by_name(self.name)
        return str(host), int(port)

    def failover(self, servers: list[RedisServer], timeout: float = 15.0, kill_clients: bool = True) -> RedisServer:
        """Force a failover (SENTINEL FAILOVER) and return the promoted server, once complete.

        Sentinel itself would demote a still-running old master only at its next INFO poll
        (every 10 s); we send what it sends (REPLICAOF, then CLIENT KILL TYPE normal unless
        ``kill_clients`` is False, leaving clients to find out by READONLY/UNBLOCKED errors)
        at once so tests need not wait. Complete means: the new master says so and every
        other server says it is a replica.
        """
        _, old_port = self.master_address()
        old = next((s for s in servers if s.port == old_port), None)
        if old is not None:
            # Replication is asynchronous: let replicas catch up so the test loses no write.
            old.sync_replicas(timeout)
        with self.client() as c:
            c.sentinel_failover(self.name)
        new = self.wait_new_master(old_port, servers, timeout)
        for server in servers:
            if server is not new and server.proc is not None and server.role() == "master":
                with server.client(socket_timeout=2) as c:
                    c.replicaof(LOCALHOST, new.port)
                    if kill_clients:
                        c.client_kill_filter(_type="normal", skipme=True)
        self._wait(lambda: all(s.role() == "slave" for s in servers if s is not new and s.proc is not None),
                   timeout, "old master to become a replica")
        return new

    def wait_new_master(self, old_port: int, servers: list[RedisServer], timeout: float = 15.0) -> RedisServer:
        """Wait until Sentinel names a master other than ``old_port`` that reports itself master."""
        by_port = {s.port: s for s in servers}

        def switched() -> RedisServer | None:
            _, port = self.master_address()
            new = by_port.get(port)
            if port == old_port or new is None or new.role() != "master":
                return None
            return new

        return self._wait(switched, timeout, f"a new master for {self.name}")

    def _wait(self, predicate: Callable[[], T], timeout: float, what: str) -> T:
        """wait_for with the Sentinel's log tail in the failure message."""
        try:
            return wait_for(predicate, timeout, what, interval=0.05, max_interval=0.2,
                            ignore=(redis.ConnectionError, redis.TimeoutError, redis.ResponseError))
        except WaitTimeout as exc:
            tail = (self.dir / "sentinel.log").read_text()[-800:]
            raise WaitTimeout(f"{exc}; sentinel log: {tail}") from None

    def stop(self) -> None:
        stop_process(self.proc, 10)
        self.proc = None

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def env(self) -> dict[str, str]:
        """Worker environment finding the master through this Sentinel (plus TLS/password)."""
        env = {k: v for k, v in self.master.env().items() if k not in ("REDIS_HOST", "REDIS_PORT")}
        env.update(REDIS_SENTINEL_HOSTS=self.address, REDIS_SENTINEL_MASTER=self.name)
        if self.password != self.master.password:
            env["REDIS_SENTINEL_PASSWORD"] = self.password
        return env


class SentinelGroup:
    """A master, its replicas and one Sentinel watching them, torn down together."""

    def __init__(self, replicas: int = 1, *, tls: bool = False, password: str = "",
                 sentinel_password: str | None = None, name: str = "mymaster") -> None:
        self.servers: list[RedisServer] = []
        self.sentinel: RedisSentinel | None = None
        try:
            master = self._add(RedisServer(tls=tls, password=password))
            for _ in range(replicas):
                self._add(RedisServer(tls=tls, password=password, ca=master.ca, replica_of=master))
            self.sentinel = RedisSentinel(master, name, password=sentinel_password).start(replicas=replicas)
        except BaseException:
            self.cleanup()
            raise

    def _add(self, server: RedisServer) -> RedisServer:
        self.servers.append(server)
        return server.start()

    @property
    def master(self) -> RedisServer:
        """The server started as master (after a failover, see RedisSentinel.failover's result)."""
        return self.servers[0]

    def failover(self, kill_clients: bool = True) -> RedisServer:
        assert self.sentinel is not None
        return self.sentinel.failover(self.servers, kill_clients=kill_clients)

    def cleanup(self) -> None:
        if self.sentinel:
            self.sentinel.cleanup()
        for server in reversed(self.servers):
            server.cleanup()
