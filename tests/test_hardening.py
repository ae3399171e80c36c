"""Regression tests for the hardening findings: bounded identifiers and numbers, all-or-nothing apply,
concurrent duplicates, and an exact samples_lost after kill -9.

Memory findings have their own files (test_memory_budget.py, test_snapshot_memory.py), and so do
start-up ownership (test_startup_ownership.py) and the fuzz test (test_fuzz.py).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch

import lossd
from lossd import _codec
from lossd.v1 import loss_service_pb2 as pb
from lossd.v1 import loss_service_pb2_grpc as pb_grpc
from lossd_server import admission as admission_module
from lossd_server import progress as progress_module
from lossd_server import servicer as servicer_module
from lossd_server import session as session_module
from lossd_server.embedded import EmbeddedServer
from lossd_server.replay import ReplayLimits, ReplayLog
from lossd_server.spec import MAX_COUNT
from tests.conftest import ols_spec
from tests.test_durability import Served, start

C, N = 6, 8
SPEC = ols_spec(C)
HUGE = (1 << 63) - 1


def batch(seed: int, n: int = N) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, C, (n,), generator=generator)
    return torch.randn(n, C, generator=generator) + 2.0 * torch.nn.functional.one_hot(labels, C), labels


@pytest.fixture()
def stub(server: EmbeddedServer) -> Iterator[pb_grpc.LossServiceStub]:
    with grpc.insecure_channel(server.target) as channel:
        yield pb_grpc.LossServiceStub(channel)


def fresh(client: lossd.Client, name: str, spec: lossd.SessionSpec = SPEC) -> str:
    client.create_session(name, spec)
    return name


def state_bytes(stub: pb_grpc.LossServiceStub, name: str) -> bytes:
    """GetState and the GetSession counters, serialised: byte-identical means nothing changed."""
    state = stub.GetState(pb.GetStateRequest(session=name)).SerializeToString(deterministic=True)
    info = stub.GetSession(pb.GetSessionRequest(name=name))
    return state + repr((info.epoch, info.samples_this_epoch, info.correct_this_epoch, info.samples_lost)).encode()


def rejected(call: Callable[[], Any]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as raised:
        call()
    error = raised.value
    assert isinstance(error, grpc.RpcError)
    return error


# 7. Long names and ids: INVALID_ARGUMENT or NOT_FOUND, with a short message ------------------------


LONG = "n" * 10_000


@pytest.mark.parametrize(
    "rpc",
    ["GetSession", "DeleteSession", "CreateSession", "ComputeLoss", "GetState", "NextEpoch", "LoadState"],
)
def test_a_10k_character_session_name_is_invalid_argument_with_a_short_message(
    stub: pb_grpc.LossServiceStub, rpc: str
) -> None:
    logits, labels = batch(0)
    requests: dict[str, Any] = {
        "GetSession": pb.GetSessionRequest(name=LONG),
        "DeleteSession": pb.DeleteSessionRequest(name=LONG),
        "CreateSession": pb.CreateSessionRequest(name=LONG, spec=SPEC.to_proto()),
        "ComputeLoss": pb.LossRequest(session=LONG, logits=_codec.encode(logits), labels=_codec.encode(labels)),
        "GetState": pb.GetStateRequest(session=LONG),
        "NextEpoch": pb.NextEpochRequest(session=LONG),
        "LoadState": pb.LoadStateRequest(session=LONG),
    }
    error = rejected(lambda: getattr(stub, rpc)(requests[rpc]))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    assert len(error.details()) < 500 and "10000 characters" in error.details()


def test_a_4_mib_request_id_is_invalid_argument_and_not_remembered(
    client: lossd.Client, stub: pb_grpc.LossServiceStub, session_name: str
) -> None:
    name = fresh(client, session_name)
    before = state_bytes(stub, name)
    logits, labels = batch(0)
    request = pb.LossRequest(
        session=name,
        logits=_codec.encode(logits),
        labels=_codec.encode(labels),
        training=True,
        need_grad=True,
        request_id="r" * (4 << 20),
    )
    error = rejected(lambda: stub.ComputeLoss(request))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "request_id" in error.details() and len(error.details()) < 500
    # In-band on a stream too, and the stream keeps serving.
    request.request_id = "with space"
    good = pb.LossRequest()
    good.CopyFrom(request)
    good.request_id = "good-1"
    responses = list(stub.LossStream(iter([request, good])))
    assert responses[0].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert not responses[1].HasField("error") and responses[1].n_used == N
    assert state_bytes(stub, name) != before  # only the good one counted
    assert client.get_session(name).samples_this_epoch == N


# 4 and 5. Numbers that cannot overflow, floats finite in float32 -----------------------------------


def _state_request(name: str, **overrides: Any) -> pb.LoadStateRequest:
    supervise = torch.full((C, C), 1.0 / C)
    accumulator = torch.zeros(C, C, dtype=torch.float64)
    counts = torch.zeros(C, dtype=torch.int64)
    fields: dict[str, Any] = {"supervise": supervise, "accumulator": accumulator, "counts": counts}
    fields.update({k: v for k, v in overrides.items() if isinstance(v, torch.Tensor)})
    state = pb.SessionState(
        epoch=overrides.get("epoch", 0),
        supervise=_codec.encode(fields["supervise"]),
        accumulator=_codec.encode(fields["accumulator"]),
        counts=_codec.encode(fields["counts"]),
        samples_this_epoch=overrides.get("samples_this_epoch", 0),
    )
    return pb.LoadStateRequest(session=name, state=state)


def _with(value: float | int, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    tensor = torch.zeros(shape, dtype=dtype)
    tensor.view(-1)[1] = value
    return tensor


@pytest.mark.parametrize(
    "case",
    [
        {"samples_this_epoch": HUGE},
        {"samples_this_epoch": MAX_COUNT + 1},
        {"epoch": HUGE},
        {"counts": _with(1 << 62, torch.int64, (C,))},
        {"counts": torch.full((C,), 1 << 61, dtype=torch.int64)},  # each fine, the sum past 2^63
        {"supervise": _with(1e300, torch.float64, (C, C))},
        {"accumulator": _with(1e300, torch.float64, (C, C))},
        {"accumulator": _with(-1.0, torch.float64, (C, C))},
    ],
    ids=[
        "samples-2^63",
        "samples-2^53+1",
        "epoch-2^63",
        "count-2^62",
        "counts-sum-2^63",
        "S-1e300",
        "acc-1e300",
        "acc<0",
    ],
)
def test_load_state_past_the_bounds_is_invalid_argument_and_the_tenant_keeps_working(
    client: lossd.Client, stub: pb_grpc.LossServiceStub, session_name: str, case: dict[str, Any]
) -> None:
    name = fresh(client, session_name)
    client.compute_loss(name, *batch(1), epoch=0)
    before = state_bytes(stub, name)
    error = rejected(lambda: stub.LoadState(_state_request(name, **case)))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    assert state_bytes(stub, name) == before
    # Nothing anywhere answers INTERNAL afterwards.
    assert name in [info.name for info in client.list_sessions()]
    client.compute_loss(name, *batch(2), epoch=0)


def test_add_statistics_cannot_push_a_total_past_the_bound(
    client: lossd.Client, stub: pb_grpc.LossServiceStub, session_name: str
) -> None:
    name = fresh(client, session_name)

    def upload(request_id: str, samples: int) -> pb.StatisticsRequest:
        return pb.StatisticsRequest(
            session=name,
            epoch=0,
            request_id=request_id,
            classes=_codec.encode(torch.zeros(0, dtype=torch.int64)),
            rows=_codec.encode(torch.zeros(0, C, dtype=torch.float64)),
            counts=_codec.encode(torch.zeros(0, dtype=torch.int64)),
            samples=samples,
            correct=0,
        )

    assert rejected(lambda: stub.AddStatistics(upload("huge", HUGE))).code() == grpc.StatusCode.INVALID_ARGUMENT
    stub.AddStatistics(upload("half", MAX_COUNT // 2 + 1))
    before = state_bytes(stub, name)
    error = rejected(lambda: stub.AddStatistics(upload("other-half", MAX_COUNT // 2 + 1)))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "next_epoch" in error.details()
    assert state_bytes(stub, name) == before
    # The refused id was not remembered as applied: a smaller upload under it is a new request.
    stub.AddStatistics(upload("other-half", 1))
    info = client.get_session(name)
    assert info.samples_this_epoch == MAX_COUNT // 2 + 2
    client.next_epoch(name, 0)  # the epoch still ends normally


def test_a_class_weight_infinite_in_float32_is_invalid_argument(
    stub: pb_grpc.LossServiceStub, session_name: str
) -> None:
    spec = lossd.SessionSpec(kind="cross_entropy", n_classes=C).to_proto()
    spec.weight.CopyFrom(_codec.encode(_with(1e300, torch.float64, (C,)) + 1.0))
    error = rejected(lambda: stub.CreateSession(pb.CreateSessionRequest(name=session_name, spec=spec)))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "float32" in error.details()


# All or nothing: a failure injected at each step of the apply path -----------------------------------


class Injected(RuntimeError):
    """The fault a test injects."""


def _raise(*args: Any, **kwargs: Any) -> Any:
    raise Injected("injected fault")


def _after(original: Callable[..., Any]) -> Callable[..., Any]:
    """``original`` runs, then the step fails: a fault after its effect."""

    def faulty(*args: Any, **kwargs: Any) -> Any:
        original(*args, **kwargs)
        raise Injected("injected fault after the step")

    return faulty


# (where, attribute, how): each step a training request passes, in order.
APPLY_STEPS: list[tuple[Any, str, str]] = [
    (servicer_module, "decode_batch", "before"),
    (session_module.Session, "_forward", "before"),
    (session_module.F, "correct_rows", "before"),
    (session_module.Session, "_check_totals", "before"),
    (session_module.Session, "_counted", "after"),  # the commit itself, then a failure
    (progress_module.ProgressFiles, "record", "before"),
    (servicer_module.LossServicer, "_applied", "before"),
    (servicer_module._codec, "scale_gradient", "before"),
    (admission_module, "serialize_loss_response", "before"),
]


@pytest.mark.parametrize("step", APPLY_STEPS, ids=[f"{where.__name__}.{attr}" for where, attr, _ in APPLY_STEPS])
@pytest.mark.parametrize("transport", ["unary", "stream"])
def test_a_failure_at_any_step_applies_all_or_nothing_and_a_resend_applies_once(
    server: EmbeddedServer,
    stub: pb_grpc.LossServiceStub,
    session_name: str,
    monkeypatch: pytest.MonkeyPatch,
    step: tuple[Any, str, str],
    transport: str,
) -> None:
    where, attribute, how = step
    with lossd.Client(server.target, retry_deadline=0) as client:
        faulty, control = fresh(client, session_name), fresh(client, session_name + "-control")
        for name in (faulty, control):
            client.compute_loss(name, *batch(1), epoch=0, request_id="warm-up")
        logits, labels = batch(2)
        expected = client.compute_loss(control, logits, labels, epoch=0, request_id="step")
        once = state_bytes(stub, control)
        before = state_bytes(stub, faulty)

        request = pb.LossRequest(
            session=faulty,
            logits=_codec.encode(logits),
            labels=_codec.encode(labels),
            training=True,
            need_grad=True,
            request_id="step",
            epoch=0,
        )

        def send() -> pb.LossResponse:
            if transport == "unary":
                return stub.ComputeLoss(request)
            (response,) = list(stub.LossStream(iter([request])))
            if response.HasField("error"):
                raise lossd.InternalError(response.error.message)
            return response

        original = getattr(where, attribute)
        monkeypatch.setattr(where, attribute, _raise if how == "before" else _after(original))
        failed = False
        try:
            send()
        except (grpc.RpcError, lossd.LossdError):
            failed = True
        monkeypatch.setattr(where, attribute, original)
        # Either nothing was applied, or all of it: never part, and never a status without its effect known.
        after_failure = state_bytes(stub, faulty)
        assert after_failure in (before, once)
        if not failed:
            assert after_failure == once

        response = send()  # the resend, with the fault gone
        assert state_bytes(stub, faulty) == once  # applied exactly once
        torch.testing.assert_close(_codec.decode(response.loss), expected.loss, rtol=0, atol=0)
        grad = _codec.unscale_gradient(_codec.decode(response.grad), response.grad_exponent)
        assert expected.grad is not None
        torch.testing.assert_close(grad, expected.grad, rtol=0, atol=0)
        send()  # and a second resend changes nothing either
        assert state_bytes(stub, faulty) == once


# 8. A concurrent duplicate gets the original's response --------------------------------------------


class GatedEvent(threading.Event):
    """An Event whose waiters wake only once ``gate`` is set too: a waiter that is slow to run."""

    def __init__(self, gate: threading.Event) -> None:
        super().__init__()
        self.gate = gate

    def wait(self, timeout: float | None = None) -> bool:
        result = super().wait(timeout)
        self.gate.wait(timeout)
        return result


def test_a_duplicate_waiting_on_the_original_gets_its_response_even_after_later_requests_settle() -> None:
    log: ReplayLog[str] = ReplayLog(ReplayLimits(ids=16, responses=2))
    release, woken = threading.Event(), threading.Event()
    outcomes: dict[str, Any] = {}

    def original(commit: Any) -> str:
        release.wait(10)
        commit.applied = True
        return "A"

    def run(key: str, compute: Callable[[Any], str]) -> None:
        try:
            outcomes[key] = log.run_once(0, "a", "fp", compute)
        except Exception as error:  # the assertion below names it
            outcomes[key] = error

    first = threading.Thread(target=run, args=("first", original))
    first.start()
    deadline = time.monotonic() + 10
    while "a" not in getattr(log._ranks.get(0), "entries", {}):
        assert time.monotonic() < deadline
        time.sleep(0.001)
    log._ranks[0].entries["a"].done = GatedEvent(woken)
    duplicate = threading.Thread(target=run, args=("duplicate", lambda commit: "applied twice"))
    duplicate.start()
    time.sleep(0.05)  # the duplicate is waiting on the original
    release.set()
    first.join(10)
    for index in range(3):  # the rank's later requests settle and push "a" out of the kept responses
        log.run_once(0, f"later-{index}", "fp", lambda commit: "later")
    woken.set()
    duplicate.join(10)
    assert outcomes == {"first": "A", "duplicate": "A"}


# 9. samples_lost counts only what was lost and not re-applied --------------------------------------


def test_samples_lost_after_kill_9_counts_only_batches_not_resent(servers: list[Served], tmp_path: Path) -> None:
    first = start(servers, tmp_path, "--snapshot-seconds", "3600")
    with lossd.Client(first.target, retry_deadline=0) as client:
        client.create_session("run", SPEC)
        for index in range(4):
            client.compute_loss("run", *batch(index), epoch=0, request_id=f"b{index}")
        client.compute_loss("run", *batch(9), epoch=0)  # under a fresh id the test never resends: lost for good
    first.kill()

    second = start(servers, tmp_path, "--snapshot-seconds", "3600")
    with lossd.Client(second.target, retry_deadline=0) as client:
        assert client.get_session("run").samples_lost == 5 * N
        # The client never saw b3's answer: it resends, the server applies it, so b3 is no longer lost.
        client.compute_loss("run", *batch(3), epoch=0, request_id="b3")
        info = client.get_session("run")
        assert (info.samples_this_epoch, info.samples_lost) == (N, 4 * N)
        client.compute_loss("run", *batch(3), epoch=0, request_id="b3")  # a repeat is not applied again
        assert (client.get_session("run").samples_this_epoch, client.get_session("run").samples_lost) == (N, 4 * N)
    second.kill()

    # b3 was applied and then lost again: lost once, not twice; the other four batches stay lost.
    third = start(servers, tmp_path, "--snapshot-seconds", "0.05")
    with lossd.Client(third.target, retry_deadline=0) as client:
        info = client.get_session("run")
        assert (info.samples_this_epoch, info.samples_lost) == (0, 5 * N)
        for index in (0, 1):
            client.compute_loss("run", *batch(index), epoch=0, request_id=f"b{index}")
        assert client.get_session("run").samples_lost == 3 * N
        deadline = time.monotonic() + 10
        while client.get_session("run").snapshot_at < client.get_session("run").updated_at:
            assert time.monotonic() < deadline
            time.sleep(0.02)
    third.kill()

    # Once a snapshot recorded it, the figure survives a restart as it was.
    fourth = start(servers, tmp_path)
    with lossd.Client(fourth.target, retry_deadline=0) as client:
        info = client.get_session("run")
        assert (info.samples_this_epoch, info.samples_lost) == (2 * N, 3 * N)
        client.compute_loss("run", *batch(2), epoch=0, request_id="b2")
        assert client.get_session("run").samples_lost == 2 * N
