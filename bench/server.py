"""Child server processes on TCP loopback, as in training: client and server in separate processes.

:class:`ServerProcess` is ``lossd serve``; :class:`ChildServer` is what it shares with the bare
gRPC echo server of :mod:`bench.echo_server`: a child that logs ``serving on HOST:PORT `` on
stderr once it serves.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Self

from bench.machine import ROOT


class ChildServer:
    """``argv`` in a child; ``target`` once its stderr says ``serving on HOST:PORT ``.

    stderr is drained by a thread (the server logs), so the pipe never fills; the last
    lines are kept for error messages.
    """

    name = "server"

    def __init__(self, argv: Sequence[str], *, startup_timeout: float = 60.0) -> None:
        self.argv = list(argv)
        # From the checkout, so that ``python -m bench.*`` children import this bench package.
        self.process = subprocess.Popen(
            self.argv, cwd=ROOT, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
        )
        self.lines: list[str] = []
        self._found = threading.Event()
        self.target = ""
        self._reader = threading.Thread(target=self._drain, daemon=True)
        self._reader.start()
        if not self._found.wait(startup_timeout) or not self.target:
            self.stop()
            raise RuntimeError(f"{self.name} did not start:\n" + "".join(self.lines[-20:]))

    def _drain(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.lines.append(line)
            del self.lines[:-200]
            if not self.target:
                match = re.search(r"serving on (\S+) ", line)
                if match:
                    self.target = match.group(1)
                    self._found.set()
        self._found.set()  # exited before serving

    @property
    def pid(self) -> int:
        return self.process.pid

    def rss_bytes(self) -> int:
        """The child's resident set size (VmRSS in /proc/PID/status)."""
        return rss_bytes(self.pid)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


class ServerProcess(ChildServer):
    """``python -m lossd_server serve --host 127.0.0.1 --port 0 ...`` in a child, with a private state dir."""

    name = "lossd serve"

    def __init__(
        self,
        *,
        store: str = "memory",
        torch_threads: int = 1,
        device: str = "cpu",
        extra: Sequence[str] = (),
        startup_timeout: float = 60.0,
    ) -> None:
        self._state_dir = tempfile.mkdtemp(prefix="lossd-bench-")
        argv = [sys.executable, "-m", "lossd_server", "serve", "--host", "127.0.0.1", "--port", "0"]
        argv += ["--store", store, "--torch-threads", str(torch_threads), "--device", device]
        argv += ["--state-dir", self._state_dir, *extra]
        super().__init__(argv, startup_timeout=startup_timeout)

    def stop(self) -> None:
        super().stop()
        shutil.rmtree(self._state_dir, ignore_errors=True)


def rss_bytes(pid: int) -> int:
    """VmRSS of a process, in bytes (Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")
