"""A server on a background thread: for tests, and for tools that need one without a separate process."""

from __future__ import annotations

import asyncio
import threading
from types import TracebackType

from lossd_server.app import Running, start
from lossd_server.config import Settings


async def _cancel_remaining_tasks() -> None:
    current = asyncio.current_task()
    tasks = [task for task in asyncio.all_tasks() if task is not current]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


class EmbeddedServer:
    """``with EmbeddedServer(Settings(port=0)) as server: ... server.target``."""

    def __init__(self, settings: Settings | None = None) -> None:
        self.settings = settings or Settings(port=0)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="lossd-embedded", daemon=True)
        self._running: Running | None = None

    @property
    def target(self) -> str:
        if self._running is None:
            raise RuntimeError("the server is not running")
        host = self.settings.bind_host
        return f"{'127.0.0.1' if host in ('0.0.0.0', '::', '[::]') else host}:{self._running.port}"

    @property
    def metrics_port(self) -> int | None:
        """The port /metrics is served on (on ``settings.bind_host``); None when metrics are off."""
        if self._running is None:
            raise RuntimeError("the server is not running")
        return self._running.metrics_port

    def start(self) -> EmbeddedServer:
        self._thread.start()
        self._running = asyncio.run_coroutine_threadsafe(start(self.settings), self._loop).result()
        return self

    def stop(self, grace: float | None = None) -> None:
        """Stop the server and its thread; raises OSError (after both stopped) if sessions could not be saved."""
        try:
            if self._running is not None:
                running, self._running = self._running, None
                wait = self.settings.grace_seconds if grace is None else grace
                asyncio.run_coroutine_threadsafe(running.stop(wait), self._loop).result()
        finally:
            self._stop_loop()

    def _stop_loop(self) -> None:
        if self._thread.is_alive():
            # Let the calls that stop() cancelled unwind inside the loop, rather than
            # being torn down with it (gRPC prints their GeneratorExit otherwise).
            asyncio.run_coroutine_threadsafe(_cancel_remaining_tasks(), self._loop).result()
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join()
            self._loop.close()

    def __enter__(self) -> EmbeddedServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
