"""The same-host shared-memory transport of the loss stream: identical results, really used,
clean fallback, no /dev/shm entry left behind, growth, one segment per stream."""

from __future__ import annotations

import contextlib
import gc
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch

import lossd
from lossd import _codec, _shm
from lossd.v1 import loss_service_pb2 as pb
from lossd.v1 import loss_service_pb2_grpc as pb_grpc
from lossd_server.config import Settings
from lossd_server.embedded import EmbeddedServer
from lossd_server.shared_memory import SharedMemoryStats
from tests.tcp_proxy import TcpProxy

pytestmark = pytest.mark.skipif(not _shm.available(), reason="no writable /dev/shm")

N, C = 64, 100


def shm_entries() -> set[str]:
    return {name for name in os.listdir(_shm.SHM_DIR) if name.startswith(_shm.NAME_PREFIX)}


def mapped_segments() -> list[str]:
    """This process's hold on lossd segments: the client's mappings, and the embedded server's descriptors
    (the server never maps a client's file: a client shrinking it would make the server's access SIGBUS)."""
    maps = [line for line in Path("/proc/self/maps").read_text().splitlines() if "/dev/shm/lossd-" in line]
    fds = []
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            if "/dev/shm/lossd-" in os.readlink(f"/proc/self/fd/{fd}"):
                fds.append(fd)
    return maps + fds


def stats(server: EmbeddedServer) -> SharedMemoryStats:
    assert server._running is not None
    return server._running.servicer.shared_memory_stats


def stream_of(client: lossd.Client) -> Any:
    stream = client._connection._stream
    assert stream is not None
    return stream


def wait_for(condition: Any, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        gc.collect()
        if condition():
            return True
        time.sleep(0.05)
    return condition()


@pytest.fixture
def no_leak() -> Iterator[None]:
    before = shm_entries()
    yield
    assert shm_entries() - before == set()


@pytest.fixture
def server() -> Iterator[EmbeddedServer]:
    with EmbeddedServer(Settings(host="127.0.0.1", port=0, device="cpu", store="memory")) as running:
        yield running


def ls_spec(n_classes: int = C) -> lossd.SessionSpec:
    return lossd.SessionSpec(kind="label_smoothing", n_classes=n_classes, smoothing=0.1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_bit_identical_to_inline(server: EmbeddedServer, no_leak: None, dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    with lossd.Client(server.target) as shm, lossd.Client(server.target, shared_memory=False) as inline:
        for client in (shm, inline):
            client.create_session("s", ls_spec())
        for _ in range(3):
            logits = (torch.randn(N, C) * 4).to(dtype)
            labels = torch.randint(0, C, (N,))
            a = shm.compute_loss("s", logits, labels)
            b = inline.compute_loss("s", logits, labels)
            assert a.loss.dtype == b.loss.dtype and torch.equal(a.loss, b.loss)
            assert a.scaled_grad is not None and b.scaled_grad is not None
            assert a.scaled_grad.dtype == dtype and torch.equal(a.scaled_grad, b.scaled_grad)
            assert a.grad_exponent == b.grad_exponent
        assert stream_of(shm).shm_segment is not None
        assert stream_of(inline).shm_segment is None
    assert stats(server).requests == 3 and stats(server).gradients == 3 and stats(server).attached == 1


def test_ols_training_statistics_equal(server: EmbeddedServer, no_leak: None) -> None:
    torch.manual_seed(1)
    with (
        lossd.OnlineLabelSmoothing(0.5, C, target=server.target) as shm,
        lossd.OnlineLabelSmoothing(0.5, C, target=server.target, shared_memory=False) as inline,
    ):
        for _epoch in range(2):
            for _ in range(4):
                logits = torch.randn(N, C)
                labels = torch.randint(0, C, (N,))
                # Mostly correct predictions, so the statistics fill up.
                logits[torch.arange(N), labels] += 3 * torch.rand(N)
                grads = []
                for module in (shm, inline):
                    z = logits.clone().requires_grad_()
                    loss = module(z, labels)
                    loss.backward()
                    grads.append((loss.detach(), z.grad))
                assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])
            for module in (shm, inline):
                module.next_epoch()
        a, b = shm.state_dict(), inline.state_dict()
        assert a.keys() == b.keys()
        for key in ("supervise", "update", "idx_count"):
            assert torch.equal(a[key], b[key]), key
        assert shm.info().epoch == inline.info().epoch == 2
    assert stats(server).requests == 8


def test_tensors_leave_the_socket(server: EmbeddedServer, no_leak: None) -> None:
    """Counted on the wire: the shared-memory stream carries control messages only."""
    logits, labels = torch.randn(256, 1000), torch.randint(0, 1000, (256,))
    sent: dict[bool, tuple[int, int]] = {}
    for shared in (True, False):
        with TcpProxy(server.target) as proxy, lossd.Client(proxy.target, shared_memory=shared) as client:
            client.create_session(f"wire-{shared}", ls_spec(1000))
            client.compute_loss(f"wire-{shared}", logits, labels)  # the handshake happens here
            up, down = proxy.forwarded("up"), proxy.forwarded("down")
            for _ in range(5):
                client.compute_loss(f"wire-{shared}", logits, labels)
            sent[shared] = ((proxy.forwarded("up") - up) // 5, (proxy.forwarded("down") - down) // 5)
    assert sent[False][0] > logits.nbytes and sent[False][1] > logits.nbytes
    assert sent[True][0] < 1024 and sent[True][1] < 1024, sent


def test_fallback_when_the_server_disables_it(no_leak: None) -> None:
    settings = Settings(host="127.0.0.1", port=0, device="cpu", store="memory", shared_memory=False)
    with EmbeddedServer(settings) as server, lossd.Client(server.target) as client:
        client.create_session("s", ls_spec())
        for _ in range(3):
            logits, labels = torch.randn(N, C), torch.randint(0, C, (N,))
            result = client.compute_loss("s", logits, labels)
            expected = torch.nn.functional.cross_entropy(logits, labels, label_smoothing=0.1)
            torch.testing.assert_close(result.loss, expected)
        stream = stream_of(client)
        assert stream.shm_segment is None and "disabled" in (stream.shm_refusal or "")
        assert stats(server).refused == 1 and stats(server).requests == 0  # remembered for the stream
        assert stream.shm_attaches == 0


def test_fallback_when_the_server_cannot_open_it(
    server: EmbeddedServer, no_leak: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another host or IPC namespace: the name does not exist where the server looks."""

    def elsewhere(name: str, size: int, nonce: bytes) -> Any:
        raise _shm.SegmentError(2, f"cannot open /dev/shm/{name}: No such file or directory")

    monkeypatch.setattr(_shm.Segment, "attach", staticmethod(elsewhere))
    with lossd.Client(server.target) as client:
        client.create_session("s", ls_spec())
        for _ in range(3):
            result = client.compute_loss("s", torch.randn(N, C), torch.randint(0, C, (N,)))
            assert result.scaled_grad is not None and result.scaled_grad.shape == (N, C)
        assert "No such file" in (stream_of(client).shm_refusal or "")
    assert stats(server).refused == 1 and stats(server).requests == 0


def test_wrong_nonce_is_refused(server: EmbeddedServer, no_leak: None) -> None:
    segment, _ = _shm.Segment.create(1 << 20)
    try:
        with pytest.raises(_shm.SegmentError, match="another nonce"):
            _shm.Segment.attach(segment.name, segment.size, b"\0" * _shm.NONCE_BYTES)
        with pytest.raises(_shm.SegmentError, match="invalid"):
            _shm.Segment.attach("../etc/passwd", segment.size, b"\0" * _shm.NONCE_BYTES)
    finally:
        segment.unlink()


def test_unary_path_stays_inline(server: EmbeddedServer, no_leak: None) -> None:
    with lossd.Client(server.target) as client:
        client.create_session("s", ls_spec())
        result = client.compute_loss("s", torch.randn(N, C), torch.randint(0, C, (N,)), stream=False)
        assert result.scaled_grad is not None
    assert stats(server).attached == 0


def test_bigger_batch_grows_the_segment(server: EmbeddedServer, no_leak: None) -> None:
    with lossd.Client(server.target) as shm, lossd.Client(server.target, shared_memory=False) as inline:
        for client in (shm, inline):
            client.create_session("s", ls_spec(1000))
        sizes = []
        for n in (8, 2048, 16):  # 8 MB of logits and gradient do not fit the first 1 MiB segment
            logits, labels = torch.randn(n, 1000), torch.randint(0, 1000, (n,))
            a, b = shm.compute_loss("s", logits, labels), inline.compute_loss("s", logits, labels)
            assert torch.equal(a.loss, b.loss) and a.scaled_grad is not None and b.scaled_grad is not None
            assert torch.equal(a.scaled_grad, b.scaled_grad)
            sizes.append(stream_of(shm).shm_segment.size)
        assert sizes[0] == _shm.MIN_SEGMENT_BYTES and sizes[1] > 2 * 2048 * 1000 * 4 and sizes[2] == sizes[1]
        assert stream_of(shm).shm_attaches == 2
    assert stats(server).attached == 2 and stats(server).requests == 3


def test_over_the_limit_goes_inline(server: EmbeddedServer, no_leak: None) -> None:
    with lossd.Client(server.target, max_message_bytes=4 << 20) as client:
        client.create_session("s", ls_spec(1000))
        client.compute_loss("s", torch.randn(8, 1000), torch.randint(0, 1000, (8,)))
        # 2.6 MB of logits fit a message, but not with their gradient in a 4 MiB segment.
        result = client.compute_loss("s", torch.randn(650, 1000), torch.randint(0, 1000, (650,)))
        assert result.scaled_grad is not None and result.scaled_grad.shape == (650, 1000)
        assert stream_of(client).shm_segment.size == _shm.MIN_SEGMENT_BYTES
    assert stats(server).requests == 1


def test_concurrent_streams_have_their_own_segments(server: EmbeddedServer, no_leak: None) -> None:
    clients = [lossd.Client(server.target) for _ in range(3)]
    names: list[str] = []
    failures: list[BaseException] = []

    def train(index: int, client: lossd.Client) -> None:
        try:
            client.create_session(f"s{index}", ls_spec())
            generator = torch.Generator().manual_seed(index)
            for _ in range(20):
                logits = torch.randn(N, C, generator=generator)
                labels = torch.randint(0, C, (N,), generator=generator)
                result = client.compute_loss(f"s{index}", logits, labels)
                expected = torch.nn.functional.cross_entropy(logits, labels, label_smoothing=0.1)
                torch.testing.assert_close(result.loss, expected)
            names.append(stream_of(client).shm_segment.name)
        except BaseException as error:
            failures.append(error)

    threads = [threading.Thread(target=train, args=(i, c)) for i, c in enumerate(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for client in clients:
        client.close()
    assert not failures, failures
    assert len(set(names)) == 3
    assert stats(server).attached == 3 and stats(server).requests == 60


def test_stream_end_unmaps_the_server_side(server: EmbeddedServer, no_leak: None) -> None:
    with lossd.Client(server.target) as client:
        client.create_session("s", ls_spec())
        client.compute_loss("s", torch.randn(N, C), torch.randint(0, C, (N,)))
        # The client's mapping and the descriptor mmap keeps for it, and the embedded server's descriptor.
        assert len(mapped_segments()) == 3
    assert wait_for(lambda: not mapped_segments()), mapped_segments()


def test_lost_response_is_resent_once_over_a_new_segment(server: EmbeddedServer, no_leak: None) -> None:
    """A cut connection: the resend (same id) reattaches on the new stream and is applied once."""
    with (
        TcpProxy(server.target) as proxy,
        lossd.OnlineLabelSmoothing(0.5, C, target=proxy.target) as module,
        lossd.OnlineLabelSmoothing(0.5, C, target=server.target, shared_memory=False) as reference,
    ):
        torch.manual_seed(2)
        for step in range(6):
            logits, labels = torch.randn(N, C), torch.randint(0, C, (N,))
            logits[torch.arange(N), labels] += 2
            if step == 3:
                proxy.cut_after("down", 1)  # the next response is lost
            a, b = logits.clone().requires_grad_(), logits.clone().requires_grad_()
            module(a, labels).backward()
            reference(b, labels).backward()
            assert torch.equal(a.grad, b.grad)
        assert proxy.cuts == 1
        assert module.info().samples_this_epoch == 6 * N  # the lost step counted once
        state, expected = module.state_dict(), reference.state_dict()
        assert torch.equal(state["update"], expected["update"])
        assert torch.equal(state["idx_count"], expected["idx_count"])
    assert stats(server).attached == 2


def test_server_restart_reattaches(tmp_path: Path, no_leak: None) -> None:
    settings = Settings(host="127.0.0.1", port=0, device="cpu", store="sqlite", state_dir=tmp_path)
    first = EmbeddedServer(settings).start()
    port = int(first.target.rsplit(":", 1)[1])
    with lossd.OnlineLabelSmoothing(0.5, C, target=first.target, session="restart") as module:
        for _ in range(3):
            module(torch.randn(N, C, requires_grad=True), torch.randint(0, C, (N,))).backward()
        first.stop()
        assert wait_for(lambda: len(mapped_segments()) == 2)  # only the client's mapping (and its descriptor) left
        with EmbeddedServer(settings.model_copy(update={"port": port})) as second:
            for _ in range(3):
                module(torch.randn(N, C, requires_grad=True), torch.randint(0, C, (N,))).backward()
            assert stats(second).attached == 1 and stats(second).requests == 3
    assert wait_for(lambda: not mapped_segments())


CHILD = """
import sys, torch, lossd
module = lossd.OnlineLabelSmoothing(0.5, 100, target=sys.argv[1], session="killed")
step = 0
while True:
    module(torch.randn(64, 100, requires_grad=True), torch.randint(0, 100, (64,))).backward()
    step += 1
    if step == 5:
        print("training", flush=True)
"""


def test_client_killed_mid_training_leaves_nothing(server: EmbeddedServer, no_leak: None) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    child = subprocess.Popen([sys.executable, "-c", CHILD, server.target], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "training"
        assert stats(server).requests >= 5
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=10)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        if child.stdout is not None:
            child.stdout.close()
    assert wait_for(lambda: not mapped_segments()), mapped_segments()  # the server dropped its mapping too


def test_a_refused_growth_keeps_the_segment_it_had(no_leak: None) -> None:
    """The server caps a segment at its max_message_bytes: a bigger batch goes inline, smaller ones stay shared."""
    settings = Settings(host="127.0.0.1", port=0, device="cpu", store="memory", max_message_bytes=4 << 20)
    with EmbeddedServer(settings) as server, lossd.Client(server.target) as client:
        client.create_session("s", ls_spec(1000))
        for n in (8, 600, 8):  # 600 x 1000: 2.4 MB of logits fit a message; with the gradient, not a 4 MiB segment
            logits, labels = torch.randn(n, 1000), torch.randint(0, 1000, (n,))
            result = client.compute_loss("s", logits, labels)
            expected = torch.nn.functional.cross_entropy(logits, labels, label_smoothing=0.1)
            torch.testing.assert_close(result.loss, expected)
        stream = stream_of(client)
        assert "over this server's limit" in (stream.shm_refusal or "")
        assert stream.shm_segment is not None and stream.shm_segment.size == _shm.MIN_SEGMENT_BYTES
        assert stats(server).refused == 1 and stats(server).requests == 2


def test_a_client_that_shrinks_its_segment_gets_an_error_and_the_server_lives(
    server: EmbeddedServer, no_leak: None
) -> None:
    """The server never maps the client's file: touching a mapping past a shrunk end would be SIGBUS,
    killing the server and every tenant's streams (the embedded server would take this test process)."""
    with lossd.Client(server.target) as client:
        client.create_session("s", ls_spec())
    segment, nonce = _shm.Segment.create(1 << 20)
    fd = os.open(segment.path, os.O_RDWR)
    requests: queue.SimpleQueue[pb.LossRequest | None] = queue.SimpleQueue()
    with grpc.insecure_channel(server.target) as channel:
        call = pb_grpc.LossServiceStub(channel).LossStream(iter(requests.get, None))  # type: ignore[no-untyped-call]
        try:
            attach = pb.SharedMemoryAttach(name=segment.name, size=segment.size, nonce=nonce)
            requests.put(pb.LossRequest(request_id="a", attach_shared_memory=attach))
            assert next(call).HasField("shared_memory_attached")
            segment.unlink()
            os.ftruncate(fd, 64)  # behind the server's back
            request = pb.LossRequest(request_id="b", session="s", training=False, need_grad=False)
            request.logits.dtype = _codec.wire_dtype(torch.float32)
            request.logits.shape.extend([N, C])
            request.logits.shared.CopyFrom(_shm.region(_shm.HEADER_BYTES, N * C * 4))
            request.labels.CopyFrom(_codec.encode(torch.zeros(N, dtype=torch.int64)))
            requests.put(request)
            response = next(call)
            assert response.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
            assert "shrank" in response.error.message
        finally:
            requests.put(None)
            os.close(fd)
    with lossd.Client(server.target) as client:  # still serving
        assert client.get_session("s").name == "s"
