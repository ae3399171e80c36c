"""Prometheus metrics: per-RPC counts and latencies, training throughput, and the store's size.

Each server owns a ``CollectorRegistry`` (never the global one), so several servers
in one process (the tests, embedded servers) keep separate figures. Counting happens
in one place, :class:`MetricsInterceptor`, which wraps every LossService handler
outside the error interceptor: it sees the status the client sees, after domain
errors became gRPC codes. A LossStream counts each loss request under its in-band
status, and the stream call itself separately in ``lossd_streams_total``.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Any
from wsgiref.simple_server import WSGIServer

import grpc
from grpc import aio
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, start_http_server
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from lossd.v1 import loss_service_pb2 as pb
from lossd_server.errors import wrap_handler
from lossd_server.store import StoreStats

SERVICE = pb.DESCRIPTOR.services_by_name["LossService"]
_PREFIX = f"/{SERVICE.full_name}/"
STREAM = "LossStream"
# A step on the local transport (lossd_server.local_transport), counted and timed like a stream request.
LOCAL_STEP = "LocalStep"
RPCS = (*(method.name for method in SERVICE.methods), LOCAL_STEP)
BARRIER = "NextEpoch"

# From a small cross-entropy batch (well under a millisecond) to a large OLS matrix transfer.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
# NextEpoch waits for the slowest rank, so its time measures rank skew: seconds to an hour.
BARRIER_BUCKETS = (0.01, 0.1, 0.5, 1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)
RATE_WINDOW_SECONDS = 60
# A call cancelled this close to its deadline was cut off by the deadline (as the client sees it).
DEADLINE_SLACK_SECONDS = 0.25

_CODE_NAMES = {code.value[0]: code.name for code in grpc.StatusCode}


def code_name(code: grpc.StatusCode | int | None) -> str:
    if code is None:
        return "OK"
    if isinstance(code, grpc.StatusCode):
        return str(code.name)
    return str(_CODE_NAMES.get(code, "UNKNOWN"))


class SampleRate:
    """Training samples per second over the last ``window`` seconds, in one-second buckets.

    For dashboards without PromQL; ``rate(lossd_training_samples_total[1m])`` is the same figure.
    """

    def __init__(self, window: int = RATE_WINDOW_SECONDS, clock: Callable[[], float] = time.monotonic) -> None:
        self._window = window
        self._clock = clock
        self._started = clock()
        self._counts = [0] * window
        self._seconds = [-1] * window  # which second each bucket holds; a stale one is reset on reuse
        self._lock = threading.Lock()  # added to by the worker threads, read by the HTTP thread

    def add(self, samples: int) -> None:
        second = int(self._clock())
        slot = second % self._window
        with self._lock:
            if self._seconds[slot] != second:
                self._seconds[slot], self._counts[slot] = second, 0
            self._counts[slot] += samples

    def per_second(self) -> float:
        now = self._clock()
        oldest = int(now) - self._window
        with self._lock:
            total = sum(count for count, second in zip(self._counts, self._seconds, strict=True) if second > oldest)
        # A server up for less than the window divides by its uptime, not by the whole window.
        return total / max(1.0, min(float(self._window), now - self._started))


class StoreCollector(Collector):
    """Reads ``store.stats()`` once per scrape, so the three gauges come from one consistent look."""

    def __init__(self, stats: Callable[[], StoreStats]) -> None:
        self._stats = stats

    def collect(self) -> Iterable[Metric]:
        stats = self._stats()
        yield GaugeMetricFamily("lossd_sessions", "Sessions held by the store.", value=stats.sessions)
        yield GaugeMetricFamily(
            "lossd_matrix_bytes",
            "Bytes of OLS matrices held (the figure --matrix-memory-bytes limits).",
            value=stats.matrix_bytes,
        )
        yield GaugeMetricFamily(
            "lossd_snapshot_age_seconds",
            "Age of the oldest change not yet snapshotted to the store (0 when all is saved or nothing persists).",
            value=stats.snapshot_age_seconds,
        )


class ServerMetrics:
    """The metrics of one server and, once :meth:`serve` is called, their HTTP endpoint."""

    def __init__(self, *, version: str, device: str, torch_version: str) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self._requests = Counter(
            "lossd_requests",
            "LossService requests by RPC and the status the client saw; LossStream counts each loss request.",
            ["rpc", "code"],
            registry=self.registry,
        )
        self._latency = Histogram(
            "lossd_request_duration_seconds",
            "Time to answer a LossService request (a LossStream request: from its arrival to its response). "
            "NextEpoch is in lossd_next_epoch_duration_seconds instead.",
            ["rpc"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self._barrier = Histogram(
            "lossd_next_epoch_duration_seconds",
            "NextEpoch call time, including the wait at the barrier for the other ranks.",
            buckets=BARRIER_BUCKETS,
            registry=self.registry,
        )
        self._streams = Counter(
            "lossd_streams",
            "Stream calls ended, by the status the stream itself ended with.",
            ["rpc", "code"],
            registry=self.registry,
        )
        self._open = Gauge("lossd_streams_open", "Streams open now.", ["rpc"], registry=self.registry)
        self._samples = Counter(
            "lossd_training_samples",
            "Training samples applied (ignore_index rows excluded; a replayed resend is not counted again).",
            registry=self.registry,
        )
        self.rate = SampleRate()
        Gauge(
            "lossd_training_samples_per_second",
            f"Training samples applied per second over the last {RATE_WINDOW_SECONDS} s.",
            registry=self.registry,
        ).set_function(self.rate.per_second)
        Info("lossd_build", "Server version, torch version and compute device.", registry=self.registry).info(
            {"version": version, "torch": torch_version, "device": device}
        )
        # Label children are looked up once, not on every call: labels() takes a lock and hashes its arguments.
        self._counts: dict[tuple[str, str], Any] = {}
        self._timers: dict[str, Any] = {rpc: self._latency.labels(rpc) for rpc in RPCS if rpc != BARRIER}
        for rpc in RPCS:
            self._count(rpc, "OK")  # every RPC shows up at 0, so rate() has a starting point
        self._http: tuple[WSGIServer, threading.Thread] | None = None

    def _count(self, rpc: str, code: str) -> Any:
        child = self._counts.get((rpc, code))
        if child is None:
            child = self._counts[rpc, code] = self._requests.labels(rpc, code)
        return child

    def observe(self, rpc: str, code: str, seconds: float) -> None:
        self._count(rpc, code).inc()
        if rpc == BARRIER:
            self._barrier.observe(seconds)
        else:
            self._timers[rpc].observe(seconds)

    def stream_opened(self, rpc: str) -> None:
        self._open.labels(rpc).inc()

    def stream_closed(self, rpc: str, code: str) -> None:
        self._open.labels(rpc).dec()
        self._streams.labels(rpc, code).inc()

    def observe_local_step(self, code: int, seconds: float) -> None:
        """A step on the local transport, which bypasses the interceptors; thread-safe like the rest."""
        self.observe(LOCAL_STEP, code_name(code), seconds)

    def add_samples(self, samples: int) -> None:
        """Called by the servicer once per applied training batch, on a worker thread."""
        self._samples.inc(samples)
        self.rate.add(samples)

    def watch(self, stats: Callable[[], StoreStats]) -> None:
        """Report the store's figures, read by ``stats`` at each scrape."""
        self.registry.register(StoreCollector(stats))

    @property
    def port(self) -> int | None:
        return int(self._http[0].server_port) if self._http is not None else None

    def interceptor(self) -> MetricsInterceptor:
        return MetricsInterceptor(self)

    def serve(self, host: str, port: int) -> int:
        """Serve ``/metrics`` over HTTP on ``host:port`` (0 picks a free port); returns the bound port."""
        self._http = start_http_server(port, addr=host, registry=self.registry)
        return int(self._http[0].server_port)

    def stop(self) -> None:
        if self._http is not None:
            (server, thread), self._http = self._http, None
            server.shutdown()
            server.server_close()
            thread.join()


def _ended_code(context: aio.ServicerContext, error: BaseException | None) -> str:
    """The status a call ended with, as the client sees it."""
    remaining = context.time_remaining()
    if remaining is not None and remaining <= 0:
        # The client's deadline is never later than ours: whatever the handler did, the client timed out.
        return "DEADLINE_EXCEEDED"
    if isinstance(error, asyncio.CancelledError | GeneratorExit) or context.cancelled():
        # The client's deadline timer started before ours, so its cancel can arrive just before our deadline.
        return "DEADLINE_EXCEEDED" if remaining is not None and remaining < DEADLINE_SLACK_SECONDS else "CANCELLED"
    if error is None or isinstance(error, aio.AbortError):
        return code_name(context.code())  # abort() and set_code() both record it on the context
    return "UNKNOWN"  # what gRPC sends for an exception that escaped every handler


class MetricsInterceptor(aio.ServerInterceptor):  # type: ignore[misc]
    """Counts and times LossService calls; must come before any interceptor that can end a call."""

    def __init__(self, metrics: ServerMetrics) -> None:
        self._metrics = metrics

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method: str = handler_call_details.method
        # Health checks and reflection are not counted: probes would drown the figures that matter.
        if handler is None or not method.startswith(_PREFIX):
            return handler
        rpc = method[len(_PREFIX) :]
        return wrap_handler(
            handler, lambda behavior: self._wrap_unary(behavior, rpc), lambda behavior: self._wrap_stream(behavior, rpc)
        )

    def _wrap_unary(self, behavior: Callable[..., Awaitable[Any]], rpc: str) -> Callable[..., Awaitable[Any]]:
        metrics = self._metrics

        async def wrapper(request: Any, context: aio.ServicerContext) -> Any:
            start = time.perf_counter()
            error: BaseException | None = None
            try:
                return await behavior(request, context)
            except BaseException as raised:
                error = raised
                raise
            finally:
                metrics.observe(rpc, _ended_code(context, error), time.perf_counter() - start)

        return wrapper

    def _wrap_stream(self, behavior: Callable[..., AsyncIterator[Any]], rpc: str) -> Callable[..., AsyncIterator[Any]]:
        metrics = self._metrics
        per_request = rpc == STREAM  # its responses carry an in-band status, one per request

        async def wrapper(request_iterator: AsyncIterator[Any], context: aio.ServicerContext) -> AsyncIterator[Any]:
            # LossStream answers each request in order with one response, so arrival times pair up with responses.
            arrivals: deque[float] = deque()

            async def timed() -> AsyncIterator[Any]:
                async for request in request_iterator:
                    arrivals.append(time.perf_counter())
                    yield request

            metrics.stream_opened(rpc)
            error: BaseException | None = None
            try:
                async for response in behavior(timed(), context):
                    if per_request:
                        start = arrivals.popleft() if arrivals else time.perf_counter()
                        failed = isinstance(response, pb.LossResponse) and response.HasField("error")
                        code = code_name(response.error.code) if failed else "OK"  # an Answer is a success
                        metrics.observe(rpc, code, time.perf_counter() - start)
                    yield response
            except BaseException as raised:
                error = raised
                raise
            finally:
                metrics.stream_closed(rpc, _ended_code(context, error))

        return wrapper
