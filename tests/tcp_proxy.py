"""A TCP proxy for fault-injection tests: forwards connections and cuts them on cue.

``with TcpProxy(server.target) as proxy: lossd.Client(proxy.target)``. Every accepted
connection is forwarded to the upstream by two pump threads, one per direction:

* :meth:`TcpProxy.cut_after` arms a one-shot rule: once ``nbytes`` more bytes have
  passed in a direction (counted from the arming, across connections), the
  connection carrying them is aborted. Only the bytes up to the cut point are
  forwarded; the rest of the chunk, and everything after it, is dropped.
  (``times=k`` re-arms it after each cut, k cuts in all.)
* :meth:`TcpProxy.cut_all` aborts every open connection now (an idle one, say).
* :meth:`TcpProxy.pause` aborts every open connection and drops each new one as
  soon as it is accepted, until :meth:`TcpProxy.resume`: an unreachable server.

An abort shuts both sockets down and closes them with ``SO_LINGER`` 0, so each peer
sees its connection end mid-stream (a FIN, then a reset), as when a route or a
server process dies. :meth:`TcpProxy.close` stops and joins every thread it started.
"""

from __future__ import annotations

import contextlib
import selectors
import socket
import struct
import threading
from dataclasses import dataclass, field
from types import TracebackType
from typing import Literal

Direction = Literal["up", "down"]  # up: client -> upstream server; down: server -> client

_CHUNK = 65536
_JOIN_TIMEOUT = 5.0


def _split(target: str) -> tuple[str, int]:
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"expected host:port, got {target!r}")
    return host.strip("[]"), int(port)


def _abort(sock: socket.socket) -> None:
    """Make the coming close() a reset, and wake any thread blocked on the socket now."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)


@dataclass
class _Rule:
    nbytes: int
    times: int  # cuts still to make
    remaining: int  # bytes still allowed through before the next cut


@dataclass
class _Connection:
    client: socket.socket
    upstream: socket.socket
    threads: list[threading.Thread] = field(default_factory=list)
    aborted: bool = False
    pumps_left: int = 2

    def socket_from(self, direction: Direction) -> socket.socket:
        return self.client if direction == "up" else self.upstream

    def socket_to(self, direction: Direction) -> socket.socket:
        return self.upstream if direction == "up" else self.client


class TcpProxy:
    """A threaded TCP proxy on 127.0.0.1 in front of ``upstream`` ("host:port")."""

    def __init__(self, upstream: str) -> None:
        self._upstream = _split(upstream)
        self._lock = threading.Lock()
        self._rules: dict[Direction, _Rule] = {}
        self._connections: list[_Connection] = []
        self._paused = False
        self._closed = False
        self._cuts = 0
        self._accepted = 0
        self._bytes: dict[Direction, int] = {"up": 0, "down": 0}
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.setblocking(False)
        self._wake_reader, self._wake_writer = socket.socketpair()
        self._acceptor = threading.Thread(target=self._accept_loop, name="tcp-proxy-accept", daemon=True)
        self._acceptor.start()

    # Observation ------------------------------------------------------------

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._listener.getsockname()[:2]
        return host, port

    @property
    def target(self) -> str:
        host, port = self.address
        return f"{host}:{port}"

    @property
    def cuts(self) -> int:
        """How many connections a rule, :meth:`cut_all` or :meth:`pause` aborted (drops while paused excluded)."""
        with self._lock:
            return self._cuts

    @property
    def accepted(self) -> int:
        """How many connections were accepted, including those dropped while paused."""
        with self._lock:
            return self._accepted

    def forwarded(self, direction: Direction) -> int:
        """Bytes forwarded in ``direction`` since the proxy started."""
        with self._lock:
            return self._bytes[direction]

    @property
    def open_connections(self) -> int:
        with self._lock:
            return sum(1 for connection in self._connections if not connection.aborted)

    def armed(self, direction: Direction) -> bool:
        """Whether a :meth:`cut_after` rule for ``direction`` has yet to fire."""
        with self._lock:
            return direction in self._rules

    # Faults -------------------------------------------------------------------

    def cut_after(self, direction: Direction, nbytes: int, *, times: int = 1) -> None:
        """Abort the connection that carries the ``nbytes``-th byte in ``direction`` from now on.

        ``nbytes`` bytes get through (the cut falls right after them), so it must be
        at least 1. With ``times`` > 1 the rule re-arms after each cut, counting
        afresh from the next chunk that arrives (on whichever connection), until
        it has cut ``times`` times. One rule per direction at a time.
        """
        if direction not in ("up", "down"):
            raise ValueError(f"direction: expected 'up' or 'down', got {direction!r}")
        if nbytes < 1 or times < 1:
            raise ValueError(f"nbytes and times: expected >= 1, got {nbytes} and {times}")
        with self._lock:
            self._check_open()
            if direction in self._rules:
                raise RuntimeError(f"a cut rule for {direction!r} is already armed")
            self._rules[direction] = _Rule(nbytes, times, nbytes)

    def disarm(self) -> None:
        with self._lock:
            self._rules.clear()

    def cut_all(self) -> int:
        """Abort every open connection now; returns how many there were."""
        with self._lock:
            return self._abort_all()

    def pause(self) -> int:
        """Abort every open connection and drop new ones until :meth:`resume`; returns how many were open."""
        with self._lock:
            self._check_open()
            self._paused = True
            return self._abort_all()

    def resume(self) -> None:
        with self._lock:
            self._paused = False

    # Lifecycle ------------------------------------------------------------------

    def close(self) -> None:
        """Abort every connection, stop listening and join every thread."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._rules.clear()
            self._abort_all(count=False)
        self._wake_writer.send(b"x")
        self._acceptor.join(_JOIN_TIMEOUT)
        with self._lock:
            threads = [thread for connection in self._connections for thread in connection.threads]
        for thread in threads:
            thread.join(_JOIN_TIMEOUT)
        for sock in (self._listener, self._wake_reader, self._wake_writer):
            sock.close()
        alive = [thread.name for thread in (self._acceptor, *threads) if thread.is_alive()]
        if alive:
            raise RuntimeError(f"TcpProxy threads still running after close(): {alive}")

    def __enter__(self) -> TcpProxy:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"TcpProxy({self.target} -> {self._upstream[0]}:{self._upstream[1]}, cuts={self.cuts})"

    # Internals -----------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("this TcpProxy is closed")

    def _abort_all(self, *, count: bool = True) -> int:
        """Called under the lock."""
        aborted = 0
        for connection in self._connections:
            if not connection.aborted:
                self._abort(connection)
                aborted += 1
        if count:
            self._cuts += aborted
        return aborted

    @staticmethod
    def _abort(connection: _Connection) -> None:
        """Called under the lock; the last pump to finish closes the sockets."""
        connection.aborted = True
        _abort(connection.client)
        _abort(connection.upstream)

    def _accept_loop(self) -> None:
        with selectors.DefaultSelector() as selector:
            selector.register(self._listener, selectors.EVENT_READ)
            selector.register(self._wake_reader, selectors.EVENT_READ)
            while True:
                selector.select()
                with self._lock:
                    if self._closed:
                        return
                try:
                    client, _ = self._listener.accept()
                except (BlockingIOError, InterruptedError):
                    continue
                client.setblocking(True)
                self._serve(client)

    def _serve(self, client: socket.socket) -> None:
        with self._lock:
            self._accepted += 1
            paused = self._paused
        if paused:
            _abort(client)
            client.close()
            return
        try:
            upstream = socket.create_connection(self._upstream, timeout=_JOIN_TIMEOUT)
        except OSError:
            _abort(client)
            client.close()
            return
        upstream.settimeout(None)
        for sock in (client, upstream):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        connection = _Connection(client, upstream)
        with self._lock:
            if self._closed or self._paused:  # closed or paused while connecting
                self._abort(connection)
                connection.pumps_left = 0
                client.close()
                upstream.close()
                return
            self._connections = [c for c in self._connections if any(t.is_alive() for t in c.threads)]
            self._connections.append(connection)
            for direction in ("up", "down"):
                thread = threading.Thread(
                    target=self._pump,
                    args=(connection, direction),
                    name=f"tcp-proxy-{direction}",
                    daemon=True,
                )
                connection.threads.append(thread)
            for thread in connection.threads:
                thread.start()

    def _pump(self, connection: _Connection, direction: Direction) -> None:
        source, sink = connection.socket_from(direction), connection.socket_to(direction)
        try:
            while True:
                try:
                    chunk = source.recv(_CHUNK)
                except OSError:
                    break
                if not chunk:
                    break
                with self._lock:
                    if connection.aborted:
                        break
                    cut = False
                    rule = self._rules.get(direction)
                    if rule is not None and len(chunk) >= rule.remaining:
                        chunk, cut = chunk[: rule.remaining], True
                        rule.times -= 1
                        if rule.times:
                            rule.remaining = rule.nbytes
                        else:
                            del self._rules[direction]
                        # Claimed for this cut: the other pump forwards nothing more, cut_all skips it.
                        connection.aborted = True
                        self._cuts += 1
                    elif rule is not None:
                        rule.remaining -= len(chunk)
                    self._bytes[direction] += len(chunk)
                if cut:
                    with contextlib.suppress(OSError):
                        sink.sendall(chunk)
                    _abort(connection.client)
                    _abort(connection.upstream)
                    break
                try:
                    sink.sendall(chunk)
                except OSError:
                    break
        finally:
            with self._lock:
                # A side that ends (EOF or error) ends the whole connection: pass the end on.
                if not connection.aborted:
                    connection.aborted = True
                    with contextlib.suppress(OSError):
                        source.shutdown(socket.SHUT_RDWR)
                    with contextlib.suppress(OSError):
                        sink.shutdown(socket.SHUT_RDWR)
                connection.pumps_left -= 1
                last = connection.pumps_left == 0
            if last:
                connection.client.close()
                connection.upstream.close()
