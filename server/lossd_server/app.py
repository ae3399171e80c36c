"""Assemble the gRPC server: LossService, health checking, reflection and the error interceptor."""

from __future__ import annotations

import asyncio
import errno
import logging
import signal
import socket
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
from grpc import aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from lossd._kernels import warm_up
from lossd._malloc import tune_malloc
from lossd.v1 import loss_service_pb2 as pb
from lossd.v1 import loss_service_pb2_grpc as pb_grpc
from lossd_server import __version__
from lossd_server.admission import AdmissionInterceptor, loss_footprint_factor
from lossd_server.auth import identify_from, log_exposure, server_credentials
from lossd_server.config import Settings
from lossd_server.device import device_memory, resolve_device
from lossd_server.durable import open_store
from lossd_server.errors import ErrorInterceptor
from lossd_server.footprint import SOFT_LABEL_DTYPES, ols_math_kernel
from lossd_server.local_transport import LocalTransport
from lossd_server.memory import MemoryAccount
from lossd_server.metrics import ServerMetrics
from lossd_server.permissions import warn_if_state_dir_writable, warn_if_token_file_readable
from lossd_server.servicer import LossServicer
from lossd_server.store import SessionStore

log = logging.getLogger("lossd_server")
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["LossService"].full_name


FLUSH_SECONDS = 0.5
# How long a call may wait for memory that calls in flight will release, before RESOURCE_EXHAUSTED.
ADMISSION_WAIT_SECONDS = 2.0


def request_memory(settings: Settings) -> MemoryAccount:
    """The request budget; refuses settings under which no maximal loss request could ever be admitted."""
    budget = settings.resolved_request_memory_bytes
    limit = settings.resolved_max_message_bytes
    needed = int(limit * loss_footprint_factor())
    if needed > budget:
        raise ValueError(
            f"max_message_bytes={limit} cannot be admitted: a loss request that large holds about "
            f"{loss_footprint_factor():g}x its size ({needed} bytes), more than request_memory_bytes={budget}; "
            "raise --request-memory-bytes or lower --max-message-bytes"
        )
    return MemoryAccount("request", budget, "request_memory_bytes")


def _refuse_busy_port(host: str, port: int) -> None:
    """Fail with one clear line when something already listens on ``host:port``.

    gRPC's own failure is a RuntimeError that only says "Failed to bind", after a
    C-core log line; probing first names the cause. The probe sets SO_REUSEADDR as
    gRPC does (so TIME_WAIT connections do not count) but not SO_REUSEPORT, so a
    server that shares its port is found too. Only EADDRINUSE is decided here;
    anything else is left to gRPC.
    """
    try:
        addresses = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except OSError:
        return
    for family, kind, proto, _, address in addresses:
        try:
            with socket.socket(family, kind, proto) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                probe.bind(address)
        except OSError as error:
            if error.errno == errno.EADDRINUSE:
                # One argument, so str() is the message alone ("[Errno 98]" would prefix it otherwise).
                raise OSError(
                    f"could not bind {host}:{port}: the port is in use (is another lossd server running?)"
                ) from None


@dataclass
class Running:
    server: aio.Server
    servicer: LossServicer
    health: health.aio.HealthServicer
    executor: ThreadPoolExecutor
    port: int
    device: torch.device
    store: SessionStore | None = None
    metrics: ServerMetrics | None = None
    local: LocalTransport | None = None

    @property
    def metrics_port(self) -> int | None:
        """The port /metrics is served on; None when metrics are off."""
        return self.metrics.port if self.metrics is not None else None

    async def stop(self, grace: float) -> None:
        """Refuse new work, let the work in flight finish for up to ``grace`` seconds, then cancel the rest.

        Trainers keep their streams open between steps; an idle stream is not
        work in flight, so it does not hold shutdown up for the whole grace period.
        """
        await self.health.enter_graceful_shutdown()
        drains = [self.servicer.drain(grace)]
        if self.local is not None:
            drains.append(asyncio.to_thread(self.local.drain, grace))
        if not all(await asyncio.gather(*drains)):
            log.warning("calls still running after %.1f s; cancelling them", grace, extra={"grace_seconds": grace})
        if self.local is not None:
            self.local.close()  # its clients see end-of-file, then reattach (or fall back) at the next server
        # A short grace lets the last responses flush before the idle streams are cancelled.
        await self.server.stop(min(grace, FLUSH_SECONDS))
        self.executor.shutdown(wait=True, cancel_futures=True)
        try:
            if self.store is not None:
                # After the last call, so every statistic is in the final snapshot. Raises OSError
                # naming the sessions whose statistics could not be saved: the caller must not
                # report a clean stop.
                self.store.close()
        finally:
            if self.metrics is not None:
                self.metrics.stop()


async def start(settings: Settings) -> Running:
    # A bad token file or TLS setting fails here, before anything is started.
    identify = identify_from(settings)
    credentials = server_credentials(settings)
    if settings.token_file is not None:
        warn_if_token_file_readable(settings.token_file)
    if settings.store != "memory":
        warn_if_state_dir_writable(settings.resolved_state_dir)  # before open_store creates a missing one 0700
    if settings.port != 0:
        _refuse_busy_port(settings.bind_host, settings.port)  # before the store is opened and checked
    device = resolve_device(settings.device)
    # Load the loss kernel now (compiled, or read from numba's cache), so no request waits for a compiler.
    math_kernel = warm_up(settings.math_kernel, device)
    soft_dtype = SOFT_LABEL_DTYPES[settings.soft_label_dtype]
    if ols_math_kernel(settings.math_kernel, soft_dtype, device) != settings.math_kernel:  # or refused here
        math_kernel += f"; OLS sessions eager (soft_label_dtype={settings.soft_label_dtype} on the CPU)"
    limit = settings.resolved_max_message_bytes
    work_memory = request_memory(settings)
    device_budget = device_memory(settings, device, work_memory.limit)
    # A damaged store file fails here too; it is checked read-only and left as it is.
    store = open_store(settings, device, work_memory, device_budget)
    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)
    executor = ThreadPoolExecutor(max_workers=settings.workers, thread_name_prefix="lossd-math")
    metrics = None
    if settings.metrics_port is not None:
        metrics = ServerMetrics(version=__version__, device=str(device), torch_version=torch.__version__)
    # Admission first, so a call is admitted before its request is read (lossd_server.admission). Then
    # metrics: it wraps the others and counts the status the client sees, after errors became codes.
    admission = AdmissionInterceptor(work_memory, limit, f"/{SERVICE_NAME}/", ADMISSION_WAIT_SECONDS)
    server = aio.server(
        interceptors=[admission, ErrorInterceptor()]
        if metrics is None
        else [admission, metrics.interceptor(), ErrorInterceptor()],
        options=[
            ("grpc.max_receive_message_length", limit),
            ("grpc.max_send_message_length", limit),
            # Without BDP probing a stream's window stays at 64 KiB until its message is read, so an
            # unread request costs no memory before admission.
            ("grpc.http2.bdp_probe", 0),
            # gRPC sets SO_REUSEPORT by default, so a second server on a busy port would start and the
            # kernel would split connections (and sessions) between the two; bind exclusively instead.
            ("grpc.so_reuseport", 0),
        ],
    )
    servicer = LossServicer(
        store,
        executor,
        identify,
        on_training_samples=metrics.add_samples if metrics is not None else None,
        inline_math_bytes=settings.inline_math_bytes,
        work_memory=work_memory,
        admission_wait=ADMISSION_WAIT_SECONDS,
    )
    if metrics is not None:
        metrics.watch(store.stats)
    pb_grpc.add_LossServiceServicer_to_server(servicer, server)  # type: ignore[no-untyped-call]
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME), server
    )
    host = settings.bind_host
    address = f"{host}:{settings.port}"
    try:
        # With TLS there is no plaintext port at all, so a plaintext client is refused.
        try:
            if credentials is None:
                port = server.add_insecure_port(address)
            else:
                port = server.add_secure_port(address, credentials)
        except RuntimeError:
            port = 0  # grpcio raises where older versions returned 0; either way gRPC logged why
        if port == 0:
            raise OSError(f"could not bind {host}:{settings.port} (the port may be in use, or the address not local)")
        if metrics is not None and settings.metrics_port is not None:
            metrics.serve(host, settings.metrics_port)  # before server.start(), so a busy port starts nothing
        local = _start_local(settings, servicer, work_memory, port, metrics)
    except BaseException:
        store.close()  # releases the state directory for the next attempt
        raise
    await server.start()
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    log.info(
        "lossd %s serving on %s:%d (device=%s, math=%s, torch=%s, workers=%d)",
        __version__,
        host,
        port,
        device,
        math_kernel,
        torch.__version__,
        settings.workers,
        extra={
            "address": f"{host}:{port}",
            "version": __version__,
            "device": str(device),
            "math_kernel": math_kernel,
            "torch": torch.__version__,
            "workers": settings.workers,
        },
    )
    if metrics is not None:
        url = f"http://{f'[{host}]' if ':' in host else host}:{metrics.port}/metrics"
        log.info("metrics on %s", url, extra={"metrics_url": url})
    log_exposure(settings, identify)
    _log_budgets(settings, work_memory, device_budget, limit, device)
    return Running(server, servicer, health_servicer, executor, port, device, store, metrics, local)


def _log_budgets(
    settings: Settings,
    work_memory: MemoryAccount,
    device_budget: MemoryAccount | None,
    limit: int,
    device: torch.device,
) -> None:
    log.info(
        "memory budgets: matrix_memory_bytes=%d (session state%s), request_memory_bytes=%d (calls in flight), "
        "max_message_bytes=%d, soft_label_dtype=%s (docs/limits.md)",
        settings.matrix_memory_bytes,
        ", replay logs; the matrices are on the device" if device_budget is not None else "",
        work_memory.limit,
        limit,
        settings.soft_label_dtype,
        extra={
            "matrix_memory_bytes": settings.matrix_memory_bytes,
            "request_memory_bytes": work_memory.limit,
            "max_message_bytes": limit,
            "soft_label_dtype": settings.soft_label_dtype,
        },
    )
    if device_budget is None:
        return
    free, total = torch.cuda.mem_get_info(device)
    log.info(
        "device memory budget: device_memory_bytes=%d of %s's %d bytes (session matrices, epoch ends, snapshots)",
        device_budget.limit,
        device,
        total,
        extra={"device_memory_bytes": device_budget.limit, "device_total_bytes": total, "device_free_bytes": free},
    )
    if device_budget.limit > free:
        log.warning(
            "device_memory_bytes=%d is more than the %d bytes free on %s now (another process uses it?): "
            "sessions the budget admits may fail with CUDA out of memory",
            device_budget.limit,
            free,
            device,
            extra={"device_memory_bytes": device_budget.limit, "device_free_bytes": free},
        )


def _start_local(
    settings: Settings, servicer: LossServicer, work_memory: MemoryAccount, port: int, metrics: ServerMetrics | None
) -> LocalTransport | None:
    """The same-host data plane, unless disabled. A default path that cannot be used (too long for a socket,
    taken by another server sharing the state directory) is skipped with a warning; an explicit one fails."""
    path = settings.local_socket_path(port)
    if path is None:
        return None
    observe = None if metrics is None else metrics.observe_local_step
    local = LocalTransport(path, servicer, work_memory, admission_wait=ADMISSION_WAIT_SECONDS, observe=observe)
    try:
        local.start()
    except OSError as error:
        if settings.local_socket is not None:
            raise
        log.warning("serving without the local transport: %s", error, extra={"local_socket": str(path)})
        return None
    servicer.serve_local(local.endpoint)
    log.info("local transport on %s", path, extra={"local_socket": str(path)})
    return local


async def serve(settings: Settings) -> None:
    """Run until SIGTERM or SIGINT, then drain gracefully."""
    if settings.tune_malloc and not tune_malloc():
        log.warning("could not set malloc thresholds (not glibc?); large requests may be slower")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    # SIGTERM before start(): a supervisor may send it as soon as it reads "serving on", and without a
    # handler then the process would die at once, skipping the drain and the final save. SIGINT after,
    # so Ctrl-C still aborts a slow start at once.
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    running = await start(settings)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    await stop.wait()
    log.info(
        "stopping: draining calls in flight for up to %.1f s",
        settings.grace_seconds,
        extra={"grace_seconds": settings.grace_seconds},
    )
    started = loop.time()
    await running.stop(settings.grace_seconds)
    log.info("stopped", extra={"stop_seconds": round(loop.time() - started, 3)})
