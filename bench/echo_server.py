"""A bare gRPC bytes echo: the floor that lossd's per-byte cost on the stream is measured against.

    python -m bench.echo_server [--kind aio|sync] [--host 127.0.0.1] [--port 0] [--workers 4] [--bdp-probe]
                                [--no-tune-malloc]

One generic bidirectional-stream method, ``/lossd.bench.Echo/Stream``, with identity
(de)serialisers: messages are the bytes as they are, no protobuf. Each request of R bytes
starts with G, a little-endian uint64, and is answered by a response of G bytes (zeros,
allocated once per size), so a step sends what a lossd training request carries (the logits
and labels in their wire dtype) and receives what its answer carries (the gradient), with
nothing else done on either side. The server logs ``echo (KIND) serving on HOST:PORT `` on
stderr, as :class:`bench.server.ChildServer` expects.

``aio`` is a ``grpc.aio`` server answering on its event loop (as lossd's server is built);
``sync`` is ``grpc.server`` with a thread pool. Both take lossd serve's server options
(message limits raised to 512 MiB, no BDP probing unless ``--bdp-probe``, no SO_REUSEPORT).
The client side, :class:`EchoStream`, uses the lossd client's channel options and keeps one
stream open, fed from a request queue, as lossd's client does. The server tunes glibc malloc
as lossd serve does (``lossd._malloc.tune_malloc``: megabyte messages from the heap, not a fresh
mmap each), unless ``--no-tune-malloc``, so the floor is not raised by page faults lossd avoids.
"""

from __future__ import annotations

import argparse
import asyncio
import queue
import struct
import sys
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
from grpc import aio

from bench.server import ChildServer

try:
    from lossd._malloc import tune_malloc as tune_malloc  # re-exported for bench.grpc_servers
except ImportError:  # a client without it: the allocator stays as it is

    def tune_malloc(mmap_threshold: int = 0, trim_threshold: int = 0, top_pad: int = 0) -> bool:
        return False


SERVICE = "lossd.bench.Echo"
METHOD = f"/{SERVICE}/Stream"
HEADER = struct.Struct("<Q")  # the response size the request asks for
MAX_MESSAGE_BYTES = 512 << 20  # as the lossd client's max_message_bytes default (gRPC's own is 4 MiB)
KINDS = ("aio", "sync")


def server_options(bdp_probe: bool = False) -> list[tuple[str, int]]:
    """lossd serve's gRPC server options (lossd_server.app), with its message limit at its 512 MiB maximum."""
    return [
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.http2.bdp_probe", int(bdp_probe)),
        ("grpc.so_reuseport", 0),
    ]


CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
]


class _Responses:
    """The response to a request: the bytes its header asks for, one preallocated object per size."""

    def __init__(self) -> None:
        self._by_size: dict[int, bytes] = {}

    def __call__(self, request: bytes) -> bytes:
        (size,) = HEADER.unpack_from(request)
        response = self._by_size.get(size)
        if response is None:
            if size > MAX_MESSAGE_BYTES:
                raise ValueError(f"a response of {size} bytes is over {MAX_MESSAGE_BYTES}")
            if len(self._by_size) >= 16:
                self._by_size.clear()
            response = self._by_size[size] = bytes(size)
        return response


def _handler(kind: str) -> grpc.GenericRpcHandler:
    respond = _Responses()

    async def aio_stream(requests: AsyncIterator[bytes], context: aio.ServicerContext) -> AsyncIterator[bytes]:
        async for request in requests:
            yield respond(request)

    def sync_stream(requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
        for request in requests:
            yield respond(request)

    # No (de)serialisers: the handler gets and returns the message bytes.
    method = grpc.stream_stream_rpc_method_handler(aio_stream if kind == "aio" else sync_stream)
    return grpc.method_handlers_generic_handler(SERVICE, {"Stream": method})


async def _serve_aio(host: str, port: int, bdp_probe: bool) -> None:
    server = aio.server(options=server_options(bdp_probe))
    server.add_generic_rpc_handlers((_handler("aio"),))
    bound = server.add_insecure_port(f"{host}:{port}")
    await server.start()
    print(f"echo (aio) serving on {host}:{bound} ", file=sys.stderr, flush=True)
    await server.wait_for_termination()


def _serve_sync(host: str, port: int, bdp_probe: bool, workers: int) -> None:
    server = grpc.server(ThreadPoolExecutor(max_workers=workers), options=server_options(bdp_probe))
    server.add_generic_rpc_handlers((_handler("sync"),))
    bound = server.add_insecure_port(f"{host}:{port}")
    server.start()
    print(f"echo (sync) serving on {host}:{bound} ", file=sys.stderr, flush=True)
    server.wait_for_termination()


class EchoServerProcess(ChildServer):
    """``python -m bench.echo_server --kind KIND`` in a child (SIGTERM ends it)."""

    name = "echo server"

    def __init__(
        self, kind: str = "aio", *, workers: int = 4, bdp_probe: bool = False, tune_malloc: bool = True
    ) -> None:
        if kind not in KINDS:
            raise ValueError(f"kind: one of {KINDS}, got {kind!r}")
        self.kind = kind
        argv = [sys.executable, "-m", "bench.echo_server", "--kind", kind, "--workers", str(workers)]
        argv += ["--bdp-probe"] if bdp_probe else []
        argv += [] if tune_malloc else ["--no-tune-malloc"]
        super().__init__(argv, startup_timeout=30.0)


class EchoStream:
    """One open stream to an echo server: :meth:`round_trip` sends ``request_bytes`` and waits for
    ``response_bytes``. The request is built once; a step costs gRPC alone."""

    def __init__(self, target: str, request_bytes: int, response_bytes: int) -> None:
        if request_bytes < HEADER.size:
            raise ValueError(f"a request carries at least the {HEADER.size}-byte header, got {request_bytes}")
        self.request_bytes, self.response_bytes = request_bytes, response_bytes
        self._request = HEADER.pack(response_bytes) + bytes(request_bytes - HEADER.size)
        self._channel = grpc.insecure_channel(target, options=CHANNEL_OPTIONS)
        self._requests: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        stream = self._channel.stream_stream(METHOD)  # no (de)serialisers: bytes as they are
        self._call: Any = stream(iter(self._requests.get, None))

    def round_trip(self) -> None:
        self._requests.put(self._request)
        response = next(self._call)
        if len(response) != self.response_bytes:
            raise RuntimeError(f"echo answered {len(response)} bytes, expected {self.response_bytes}")

    def close(self) -> None:
        self._requests.put(None)
        self._call.cancel()
        self._channel.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.echo_server", description=__doc__.split("\n\n")[0])
    parser.add_argument("--kind", choices=KINDS, default="aio")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free one")
    parser.add_argument("--workers", type=int, default=4, help="the sync server's thread pool (default 4)")
    parser.add_argument("--bdp-probe", action="store_true", help="turn gRPC's BDP probing on (lossd serve: off)")
    parser.add_argument("--no-tune-malloc", action="store_true", help="leave glibc malloc as it is (lossd: tuned)")
    args = parser.parse_args(argv)
    if not args.no_tune_malloc:
        tune_malloc()
    try:
        if args.kind == "aio":
            asyncio.run(_serve_aio(args.host, args.port, args.bdp_probe))
        else:
            _serve_sync(args.host, args.port, args.bdp_probe, args.workers)
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
