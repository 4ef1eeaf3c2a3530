"""A TCP proxy in front of a real redis-server that loses one reply at the worst moment.

The command reaches Redis and runs there (an item really moves into a processing
list); then the reply is dropped with the connection ("cut") or held back past the
client's socket timeout ("delay"). That is what a Redis restart or a network blip
does to a client now and then, forced here on purpose: it cannot be timed for real.
Everything else is forwarded byte for byte.
"""

from __future__ import annotations

import socket
import threading
from dataclasses import dataclass, field


@dataclass
class _Plan:
    request: bytes
    mode: str
    delay: float
    left: int


@dataclass
class RedisFaultProxy:
    upstream_port: int
    host: str = "127.0.0.1"
    port: int = 0
    faults: int = 0
    _plan: _Plan | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _listener: socket.socket | None = None
    _closing: bool = False
    _released: threading.Event = field(default_factory=threading.Event)

    def start(self) -> RedisFaultProxy:
        self._listener = socket.create_server((self.host, 0))
        self.port = self._listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True, name="fault-proxy").start()
        return self

    def arm(self, request: str, mode: str = "cut", *, delay: float = 0.0, times: int = 1) -> None:
        """Lose the next ``times`` non-nil replies to requests containing ``request``
        (a command name such as "BLMOVE", or any argument, e.g. a file name)."""
        assert mode in ("cut", "delay")
        with self._lock:
            self._plan = _Plan(request.encode(), mode, delay, times)

    def stop(self) -> None:
        self._closing = True
        self._released.set()
        if self._listener is not None:
            self._listener.close()

    # -- plumbing --

    def _accept(self) -> None:
        assert self._listener is not None
        while not self._closing:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection((self.host, self.upstream_port), timeout=5)
                upstream.settimeout(None)
            except OSError:  # Redis is down (restarting): the client sees a dropped connection
                _close(client)
                continue
            watched = threading.Event()  # the last request on this connection is the armed command
            threading.Thread(target=self._requests, args=(client, upstream, watched), daemon=True).start()
            threading.Thread(target=self._replies, args=(upstream, client, watched), daemon=True).start()

    def _requests(self, src: socket.socket, dst: socket.socket, watched: threading.Event) -> None:
        try:
            while data := src.recv(65536):
                with self._lock:
                    if self._plan is not None and self._plan.request in data:
                        watched.set()
                    else:
                        watched.clear()
                dst.sendall(data)
        except OSError:
            pass
        finally:
            _close(src, dst)

    def _replies(self, src: socket.socket, dst: socket.socket, watched: threading.Event) -> None:
        try:
            while data := src.recv(65536):
                if watched.is_set() and not data.startswith(_NIL):
                    plan = self._take()
                    if plan is not None and plan.mode == "cut":
                        return  # the command ran on the server; its reply is lost with the connection
                    if plan is not None:
                        self._released.wait(plan.delay)  # slower than the client's socket timeout
                dst.sendall(data)
        except OSError:
            pass
        finally:
            _close(src, dst)

    def _take(self) -> _Plan | None:
        with self._lock:
            plan = self._plan
            if plan is None:
                return None
            plan.left -= 1
            if plan.left <= 0:
                self._plan = None
            self.faults += 1
            return plan


#: Nil replies (RESP2 bulk/array, RESP3): a BLMOVE that timed out moved nothing, so its reply is kept.
_NIL = (b"$-1\r\n", b"*-1\r\n", b"_\r\n")


def _close(*socks: socket.socket) -> None:
    for sock in socks:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        sock.close()
