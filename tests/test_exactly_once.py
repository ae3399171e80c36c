"""A training request's statistics are applied at most once per (session, rank, request id).

Requests go through the raw stub where the bytes of two responses are compared, so
"identical" means byte for byte, not merely close.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
import torch

import lossd
from lossd import _codec
from lossd.v1 import loss_service_pb2 as pb
from lossd.v1 import loss_service_pb2_grpc as pb_grpc
from lossd_server import replay as replay_module
from lossd_server.config import Settings
from lossd_server.embedded import EmbeddedServer
from tests.conftest import ComputeGate

C = 5
N = 16
SPEC = lossd.SessionSpec(kind="online_label_smoothing", n_classes=C, smoothing=0.1, alpha=0.5, world_size=2)


def batch(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, C, (N,), generator=g)
    return torch.randn(N, C, generator=g) + 2.0 * torch.nn.functional.one_hot(labels, C), labels


def request(session: str, request_id: str, seed: int = 0, *, rank: int = 0, **fields: Any) -> pb.LossRequest:
    logits, labels = batch(seed)
    message = pb.LossRequest(
        session=session,
        logits=_codec.encode(logits),
        labels=_codec.encode(labels),
        training=True,
        need_grad=True,
        request_id=request_id,
        rank=rank,
        epoch=0,
    )
    for name, value in fields.items():
        if isinstance(value, pb.Tensor):
            getattr(message, name).CopyFrom(value)
        else:
            setattr(message, name, value)
    return message


@pytest.fixture()
def stub(server: EmbeddedServer) -> Iterator[pb_grpc.LossServiceStub]:
    options = [("grpc.max_receive_message_length", 64 << 20)]
    with grpc.insecure_channel(server.target, options=options) as channel:
        yield pb_grpc.LossServiceStub(channel)  # type: ignore[no-untyped-call]


@pytest.fixture()
def session(client: lossd.Client, session_name: str) -> Iterator[str]:
    client.create_session(session_name, SPEC)
    yield session_name
    client.delete_session(session_name)


def counted(client: lossd.Client, name: str) -> tuple[int, torch.Tensor, torch.Tensor]:
    state = client.get_state(name)
    return state.samples_this_epoch, state.accumulator, state.counts


def test_a_resent_request_counts_once_and_gets_the_same_bytes(
    client: lossd.Client, stub: pb_grpc.LossServiceStub, session: str
) -> None:
    first = stub.ComputeLoss(request(session, "step-1"))
    once = counted(client, session)
    assert once[0] == N and once[2].sum() > 0  # the batch was counted, with correct predictions
    again = stub.ComputeLoss(request(session, "step-1"))
    assert again.SerializeToString() == first.SerializeToString()
    twice = counted(client, session)
    assert twice[0] == N and torch.equal(twice[1], once[1]) and torch.equal(twice[2], once[2])
    # Control: a new id with the same data is a new step and is counted.
    stub.ComputeLoss(request(session, "step-2"))
    assert counted(client, session)[0] == 2 * N


def test_a_resend_on_the_stream_gets_the_original_response(client: lossd.Client, session: str) -> None:
    logits, labels = batch(5)
    first = client.compute_loss(session, logits, labels, request_id="s-1", epoch=0)
    again = client.compute_loss(session, logits, labels, request_id="s-1", epoch=0)
    assert torch.equal(first.loss, again.loss) and torch.equal(first.scaled_grad, again.scaled_grad)
    assert counted(client, session)[0] == N


def test_a_resend_after_the_epoch_ended_still_gets_its_original_answer(
    client: lossd.Client, stub: pb_grpc.LossServiceStub, session: str
) -> None:
    """The reply to the last step was lost and the epoch finished meanwhile: the resend is
    answered from the log, not refused as a stale epoch, and not counted into the new epoch."""
    first = stub.ComputeLoss(request(session, "last-step"))
    barrier = threading.Thread(target=client.next_epoch, args=(session, 0), kwargs={"rank": 1})
    barrier.start()
    client.next_epoch(session, 0, rank=0)
    barrier.join()
    assert stub.ComputeLoss(request(session, "last-step")).SerializeToString() == first.SerializeToString()
    assert counted(client, session)[0] == 0


def test_concurrent_copies_compute_once_and_get_identical_responses(
    client: lossd.Client,
    stub: pb_grpc.LossServiceStub,
    session: str,
    compute_gate: ComputeGate,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    waiting = threading.Event()
    original_outcome = replay_module.ReplayLog._outcome

    def outcome(self: Any, *args: Any) -> Any:
        waiting.set()  # the copy has found the first one in flight and waits for it
        return original_outcome(self, *args)

    monkeypatch.setattr(replay_module.ReplayLog, "_outcome", outcome)
    responses: list[pb.LossResponse] = []
    first = threading.Thread(target=lambda: responses.append(stub.ComputeLoss(request(session, "dup"))))
    first.start()
    assert compute_gate.entered.acquire(timeout=10)  # the first copy is computing
    second = threading.Thread(target=lambda: responses.append(stub.ComputeLoss(request(session, "dup"))))
    second.start()
    assert waiting.wait(timeout=10)
    compute_gate.release.set()
    first.join(10)
    second.join(10)
    assert len(responses) == 2 and responses[0].SerializeToString() == responses[1].SerializeToString()
    assert not compute_gate.entered.acquire(blocking=False)  # computed exactly once
    assert counted(client, session)[0] == N


def test_ids_are_per_rank(client: lossd.Client, stub: pb_grpc.LossServiceStub, session: str) -> None:
    stub.ComputeLoss(request(session, "step-1", rank=0))
    stub.ComputeLoss(request(session, "step-1", rank=1))
    assert counted(client, session)[0] == 2 * N


def test_an_id_reused_for_another_request_is_refused(
    client: lossd.Client, stub: pb_grpc.LossServiceStub, session: str
) -> None:
    stub.ComputeLoss(request(session, "once"))
    other_logits = torch.randn(N + 1, C)
    other_labels = torch.zeros(N + 1, dtype=torch.int64)
    other = request(session, "once", logits=_codec.encode(other_logits), labels=_codec.encode(other_labels))
    with pytest.raises(grpc.RpcError) as raised:
        stub.ComputeLoss(other)
    assert raised.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "already used for a different request" in raised.value.details()
    assert counted(client, session)[0] == N


def test_a_failed_request_applied_nothing_so_its_id_may_be_sent_again(
    client: lossd.Client, stub: pb_grpc.LossServiceStub, session: str
) -> None:
    bad = request(session, "fix-me", labels=_codec.encode(torch.full((N,), C)))  # labels out of range
    with pytest.raises(grpc.RpcError) as raised:
        stub.ComputeLoss(bad)
    assert raised.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert counted(client, session)[0] == 0
    fixed = stub.ComputeLoss(request(session, "fix-me"))
    assert fixed.n_used == N and counted(client, session)[0] == N


def test_eval_requests_change_nothing_however_often_they_are_sent(
    client: lossd.Client, stub: pb_grpc.LossServiceStub, session: str
) -> None:
    first = stub.ComputeLoss(request(session, "eval", training=False))
    again = stub.ComputeLoss(request(session, "eval", training=False))
    assert first.SerializeToString() == again.SerializeToString()
    assert counted(client, session)[0] == 0


def test_the_memory_is_bounded_per_rank() -> None:
    """The last ``replay_responses`` responses are kept; an older resend that is still remembered
    fails rather than counting twice; ids beyond ``replay_ids`` are forgotten."""
    settings = Settings(host="127.0.0.1", port=0, device="cpu", workers=2, replay_ids=4, replay_responses=2)
    with EmbeddedServer(settings) as running, lossd.Client(running.target) as client:
        client.create_session("bounded", SPEC)
        with grpc.insecure_channel(running.target) as channel:
            stub = pb_grpc.LossServiceStub(channel)  # type: ignore[no-untyped-call]
            responses = {i: stub.ComputeLoss(request("bounded", f"id-{i}", seed=i)) for i in range(4)}
            assert counted(client, "bounded")[0] == 4 * N
            for i in (2, 3):  # kept
                assert stub.ComputeLoss(request("bounded", f"id-{i}", seed=i)) == responses[i]
            for i in (0, 1):  # remembered, response dropped
                with pytest.raises(grpc.RpcError) as raised:
                    stub.ComputeLoss(request("bounded", f"id-{i}", seed=i))
                assert raised.value.code() is grpc.StatusCode.FAILED_PRECONDITION
                assert "no longer kept" in raised.value.details() and "last 2 per rank" in raised.value.details()
            assert counted(client, "bounded")[0] == 4 * N
            stub.ComputeLoss(request("bounded", "id-4", seed=4))  # id-0 drops out of the 4 remembered
            stub.ComputeLoss(request("bounded", "id-0", seed=0))  # so this is a new request
            assert counted(client, "bounded")[0] == 6 * N
            log = running._running.servicer._store.get("", "bounded").replay._ranks[0]  # type: ignore[union-attr]
            assert len(log.entries) == 4 and sum(entry.response is not None for entry in log.entries.values()) == 2
