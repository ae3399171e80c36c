"""Assemble the gRPC server: LossService, health checking, reflection and the error interceptor."""

from __future__ import annotations

import asyncio
import logging
import signal
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
from grpc import aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from lossd.v1 import loss_service_pb2 as pb
from lossd.v1 import loss_service_pb2_grpc as pb_grpc
from lossd_server import __version__
from lossd_server.config import Settings
from lossd_server.device import resolve_device
from lossd_server.errors import ErrorInterceptor
from lossd_server.malloc import tune_malloc
from lossd_server.replay import ReplayLimits
from lossd_server.servicer import LossServicer
from lossd_server.store import MemoryStore

log = logging.getLogger("lossd_server")
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["LossService"].full_name


FLUSH_SECONDS = 0.5


@dataclass
class Running:
    server: aio.Server
    servicer: LossServicer
    health: health.aio.HealthServicer
    executor: ThreadPoolExecutor
    port: int
    device: torch.device

    async def stop(self, grace: float) -> None:
        """Refuse new work, let the work in flight finish for up to ``grace`` seconds, then cancel the rest.

        Trainers keep their streams open between steps; an idle stream is not
        work in flight, so it does not hold shutdown up for the whole grace period.
        """
        await self.health.enter_graceful_shutdown()
        if not await self.servicer.drain(grace):
            log.warning("calls still running after %.1f s; cancelling them", grace)
        # A short grace lets the last responses flush before the idle streams are cancelled.
        await self.server.stop(min(grace, FLUSH_SECONDS))
        self.executor.shutdown(wait=True, cancel_futures=True)


async def start(settings: Settings) -> Running:
    device = resolve_device(settings.device)
    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)
    executor = ThreadPoolExecutor(max_workers=settings.workers, thread_name_prefix="lossd-math")
    limit = settings.max_message_bytes
    server = aio.server(
        interceptors=[ErrorInterceptor()],
        options=[("grpc.max_receive_message_length", limit), ("grpc.max_send_message_length", limit)],
    )
    store = MemoryStore(
        device=device,
        max_sessions=settings.max_sessions,
        matrix_memory_bytes=settings.matrix_memory_bytes,
        replay=ReplayLimits(ids=settings.replay_ids, responses=settings.replay_responses),
    )
    servicer = LossServicer(store, executor)
    pb_grpc.add_LossServiceServicer_to_server(servicer, server)  # type: ignore[no-untyped-call]
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME), server
    )
    host = settings.bind_host
    port = server.add_insecure_port(f"{host}:{settings.port}")
    if port == 0:
        raise OSError(f"could not bind {host}:{settings.port}")
    await server.start()
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    log.info(
        "lossd %s serving on %s:%d (device=%s, torch=%s, workers=%d)",
        __version__,
        host,
        port,
        device,
        torch.__version__,
        settings.workers,
    )
    return Running(server, servicer, health_servicer, executor, port, device)


async def serve(settings: Settings) -> None:
    """Run until SIGTERM or SIGINT, then drain gracefully."""
    if settings.tune_malloc and not tune_malloc():
        log.warning("could not set malloc thresholds (not glibc?); large requests may be slower")
    running = await start(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("stopping: draining calls in flight for up to %.1f s", settings.grace_seconds)
    await running.stop(settings.grace_seconds)
    log.info("stopped")
