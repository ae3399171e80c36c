"""The client survives what a training loop meets: slow or restarted servers, interrupts, copies."""

from __future__ import annotations

import copy
import os
import pickle
import threading
import time

import grpc
import pytest
import torch
import torch.nn.functional as F

import lossd
from lossd._stream import LossStream
from lossd.v1 import loss_service_pb2 as pb
from lossd_server.config import Settings
from lossd_server.embedded import EmbeddedServer
from tests.conftest import ComputeGate


def _readers() -> int:
    return sum(1 for thread in threading.enumerate() if thread.name == "lossd-stream-watchdog")


def _wait_for_readers(count: int) -> int:
    deadline = time.monotonic() + 5
    while _readers() > count and time.monotonic() < deadline:
        time.sleep(0.01)
    return _readers()


def test_a_stream_timeout_raises_and_the_next_call_gets_its_own_answer(
    server: EmbeddedServer, session_name: str, compute_gate: ComputeGate
) -> None:
    with lossd.Client(server.target, timeout=0.5) as client:
        client.create_session(session_name, lossd.SessionSpec(kind="cross_entropy", n_classes=3))
        slow = torch.tensor([[5.0, 0.0, 0.0]])
        with pytest.raises(lossd.DeadlineExceededError):
            client.compute_loss(session_name, slow, torch.tensor([0]))
        compute_gate.release.set()  # the late answer to the abandoned request must not be taken for the next
        logits, labels = torch.tensor([[0.0, 0.0, 9.0]]), torch.tensor([0])
        result = client.compute_loss(session_name, logits, labels)
        torch.testing.assert_close(result.loss, F.cross_entropy(logits, labels))


def test_broken_streams_do_not_leak_reader_threads() -> None:
    baseline = _readers()
    settings = Settings(port=0, device="cpu", max_message_bytes=4 << 20)
    # The gRPC stream: the local transport has no message limit to break it (its segment can hold more).
    with EmbeddedServer(settings) as server, lossd.Client(server.target, transport="grpc") as client:
        client.create_session("big", lossd.SessionSpec(kind="cross_entropy", n_classes=1000))
        too_big, labels = torch.randn(1200, 1000), torch.zeros(1200, dtype=torch.long)
        for _ in range(5):  # each oversized request breaks its stream; the next call opens a new one
            with pytest.raises(lossd.ResourceExhaustedError):
                client.compute_loss("big", too_big, labels)
            assert client.compute_loss("big", too_big[:10], labels[:10]).n_used == 10
        assert _wait_for_readers(baseline + 1) == baseline + 1
    assert _wait_for_readers(baseline) == baseline


def test_a_dropped_client_releases_its_stream() -> None:
    baseline = _readers()
    with EmbeddedServer(Settings(port=0, device="cpu")) as server:
        client = lossd.Client(server.target)
        client.create_session("s", lossd.SessionSpec(kind="cross_entropy", n_classes=2))
        client.compute_loss("s", torch.zeros(1, 2), torch.tensor([1]))
        del client
        assert _wait_for_readers(baseline) == baseline


def test_a_restarted_server_is_picked_up_by_a_stateless_module() -> None:
    first = EmbeddedServer(Settings(port=0, device="cpu", grace_seconds=0)).start()
    port = int(first.target.rsplit(":", 1)[1])
    logits, labels = torch.randn(4, 5), torch.tensor([0, 1, 2, 3])
    with lossd.CrossEntropyLoss(label_smoothing=0.1, target=first.target) as criterion:
        expected = F.cross_entropy(logits, labels, label_smoothing=0.1)
        torch.testing.assert_close(criterion(logits, labels), expected)
        first.stop()
        with EmbeddedServer(Settings(port=port, device="cpu", grace_seconds=0)):
            # The idle stream died with the old server and the session with its memory:
            # the module reopens the stream and recreates the stateless session.
            torch.testing.assert_close(criterion(logits, labels), expected)


def test_a_lost_ols_session_is_an_error_not_a_silent_restart(client: lossd.Client, session_name: str) -> None:
    with lossd.OnlineLabelSmoothing(0.5, 4, session=session_name, client=client) as criterion:
        criterion(torch.randn(3, 4), torch.tensor([0, 1, 2]))
        client.delete_session(session_name)
        with pytest.raises(lossd.NotFoundError):
            criterion(torch.randn(3, 4), torch.tensor([0, 1, 2]))


def test_autocast_returns_a_float32_loss_like_torch(server: EmbeddedServer) -> None:
    model = torch.nn.Linear(8, 6)
    x, y = torch.randn(16, 8), torch.randint(0, 6, (16,))
    with lossd.CrossEntropyLoss(label_smoothing=0.1, target=server.target) as criterion:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(x)
            local = F.cross_entropy(logits, y, label_smoothing=0.1)
            remote = criterion(logits, y)
        assert logits.dtype == torch.bfloat16
        assert remote.dtype == local.dtype == torch.float32
        torch.testing.assert_close(remote, local, rtol=1e-6, atol=1e-6)
        (remote * 65536.0).backward()  # GradScaler's initial scale: finite in float32
        assert model.weight.grad is not None and bool(torch.isfinite(model.weight.grad).all())


def test_next_epoch_from_two_modules_sharing_a_session_advances_once(client: lossd.Client, session_name: str) -> None:
    with (
        lossd.OnlineLabelSmoothing(0.5, 4, session=session_name, client=client) as rank0,
        lossd.OnlineLabelSmoothing(0.5, 4, session=session_name, client=client) as rank1,
    ):
        rank0.next_epoch()
        rank1.next_epoch()  # the epoch it ended is already over: done, not an error
        assert rank0.epoch == rank1.epoch == client.get_session(session_name).epoch == 1
        rank0.next_epoch()
        rank0.next_epoch()
        assert client.get_session(session_name).epoch == 3
        with pytest.raises(lossd.FailedPreconditionError):
            rank1.next_epoch()  # rank1 would end epoch 1, but the session is two epochs past it
        assert client.get_session(session_name).epoch == 3


@pytest.mark.parametrize("private", [True, False], ids=["private", "named"])
def test_modules_survive_deepcopy_and_pickle(server: EmbeddedServer, session_name: str, private: bool) -> None:
    named = None if private else session_name
    model = torch.nn.Module()  # a model holding its loss, as EMA helpers deep-copy it
    model.net = torch.nn.Linear(4, 3)
    model.criterion = lossd.OnlineLabelSmoothing(0.5, 3, session=named, target=server.target)
    x, y = torch.randn(5, 4), torch.tensor([0, 1, 2, 0, 1])
    expected = model.criterion(model.net(x), y)
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        criterion = clone.criterion
        assert isinstance(criterion, lossd.OnlineLabelSmoothing)
        assert (criterion.session != model.criterion.session) == private
        torch.testing.assert_close(criterion(clone.net(x), y), expected)
        criterion.close()
    model.criterion.close()


def test_probability_targets_are_refused_with_a_clear_error(server: EmbeddedServer) -> None:
    with lossd.CrossEntropyLoss(target=server.target) as criterion, pytest.raises(TypeError, match="class-index"):
        criterion(torch.randn(2, 3), torch.softmax(torch.randn(2, 3), dim=1))


class _EndedCall(grpc.RpcError, grpc.Call):  # type: ignore[misc]
    """A stream call that the server ended, while idle, with PERMISSION_DENIED."""

    def __iter__(self) -> _EndedCall:
        return self

    def __next__(self) -> object:
        raise self

    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.PERMISSION_DENIED

    def details(self) -> str:
        return "token revoked"

    def done(self) -> bool:
        return True

    def cancel(self) -> bool:
        return False


def _ended_stream(requests: object) -> _EndedCall:
    return _EndedCall()


def test_a_stream_that_ended_while_idle_reports_the_servers_error_not_a_generic_one() -> None:
    stream = LossStream(_ended_stream, timeout=5)
    _wait_for_readers(0)
    with pytest.raises(lossd.PermissionDeniedError, match="token revoked"):
        stream.call_tensors(pb.LossRequest(request_id="r1"), torch.zeros(1, 2), torch.zeros(1, dtype=torch.int64))


@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
def test_a_client_inherited_through_fork_refuses_to_be_used(server: EmbeddedServer) -> None:
    """A forked child (a DataLoader worker, say) sharing the parent's channel and shared-memory
    segment could write its tensors under the parent's request in flight: it is told to make its own."""
    with lossd.Client(server.target) as client:
        client.create_session("forked", lossd.SessionSpec(kind="cross_entropy", n_classes=3))
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: report what using the inherited client does, then leave without cleanup
            try:
                client.compute_loss("forked", torch.zeros(2, 3), torch.tensor([0, 1]))
                message = b"used"
            except RuntimeError as error:
                message = str(error).encode()
            os.write(write, message)
            os._exit(0)
        os.close(write)
        _, status = os.waitpid(pid, 0)
        with os.fdopen(read, "rb") as pipe:
            reported = pipe.read().decode()
        assert os.waitstatus_to_exitcode(status) == 0
        assert "connections do not survive fork" in reported
        assert client.compute_loss("forked", torch.zeros(2, 3), torch.tensor([0, 1])).n_used == 2  # the parent's works
