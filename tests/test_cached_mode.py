"""Epoch-cached OLS (``OnlineLabelSmoothing(..., cached=True)``) against the remote mode, and AddStatistics.

Exactness: given the same S, the cached module runs the server's own functions on
the same logits, so every loss and gradient is equal bit for bit. S itself is
equal bit for bit whenever each accumulator row is summed in the same order
(one upload per epoch and per class row, as in the single-rank and
disjoint-label tests). When uploads split the sums differently (background
uploads, two ranks adding to the same rows), the float64 accumulator differs by
re-association only, a relative 1e-15 or so for these few hundred samples; S is
that divided by the count and rounded to float32, so at most one float32 ulp
(2^-24 relative) flips. Those tests compare S with rtol=1e-6 (16 ulps), and
later epochs' losses against the remote mode with rtol=1e-5, and still exactly
against the server's own loss on the same S.
"""

from __future__ import annotations

import copy
import dataclasses
import re
import socket
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
from lossd import functional as LF
from lossd.v1 import loss_service_pb2 as pb
from lossd.v1 import loss_service_pb2_grpc as pb_grpc
from lossd_server.config import Settings
from lossd_server.embedded import EmbeddedServer
from tests.conftest import ols_spec
from tests.test_durability import Served

C, N = 10, 32
EPOCHS, STEPS = 3, 4
S_RTOL, S_ATOL = 1e-6, 1e-12  # S up to float summation order: see the module docstring


def batch(seed: int, classes: range = range(C), n: int = N) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    labels = torch.tensor(list(classes))[torch.randint(0, len(classes), (n,), generator=generator)]
    logits = torch.randn(n, C, generator=generator) + 2.0 * torch.nn.functional.one_hot(labels, C)
    return logits, labels


def step(module: lossd.OnlineLabelSmoothing, logits: torch.Tensor, labels: torch.Tensor) -> tuple[Any, Any]:
    leaf = logits.clone().requires_grad_()
    loss = module(leaf, labels)
    loss.sum().backward()
    return loss.detach(), leaf.grad


def ols(server: EmbeddedServer, session: str, **kwargs: Any) -> lossd.OnlineLabelSmoothing:
    kwargs.setdefault("barrier_timeout", 30)
    return lossd.OnlineLabelSmoothing(0.5, C, target=server.target, session=session, **kwargs)


def names(session_name: str) -> tuple[str, str]:
    return f"{session_name}-remote", f"{session_name}-cached"


def assert_equal(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual, expected, rtol=0, atol=0, equal_nan=True)


def assert_same_s(cached: lossd.SessionState, remote: lossd.SessionState, exact: bool, samples: bool = True) -> None:
    assert cached.epoch == remote.epoch
    if samples:  # not across ranks: the other rank may already train the next epoch, remotely or locally
        assert cached.samples_this_epoch == remote.samples_this_epoch
    if exact:
        assert_equal(cached.supervise, remote.supervise)
    else:
        torch.testing.assert_close(cached.supervise, remote.supervise, rtol=S_RTOL, atol=S_ATOL)


@pytest.fixture()
def stub(server: EmbeddedServer) -> Iterator[pb_grpc.LossServiceStub]:
    with grpc.insecure_channel(server.target) as channel:
        yield pb_grpc.LossServiceStub(channel)  # type: ignore[no-untyped-call]


# Cached mode equals remote mode ------------------------------------------------------------------


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"reduction": "sum", "ignore_index": 3, "weight": torch.linspace(0.5, 1.5, C)},
        {"reduction": "none", "init": "zeros", "empty_class": "uniform"},
    ],
    ids=["mean", "sum-weighted-ignore", "none-zeros"],
)
def test_single_rank_cached_equals_remote_bit_for_bit(
    server: EmbeddedServer, session_name: str, options: dict[str, Any]
) -> None:
    remote_name, cached_name = names(session_name)
    with (
        ols(server, remote_name, **options) as remote,
        ols(server, cached_name, cached=True, upload_every=None, upload_seconds=None, **options) as cached,
    ):
        for epoch in range(EPOCHS):
            for i in range(STEPS):
                logits, labels = batch(100 * epoch + i)
                remote_loss, remote_grad = step(remote, logits, labels)
                cached_loss, cached_grad = step(cached, logits, labels)
                assert_equal(cached_loss, remote_loss)
                assert_equal(cached_grad, remote_grad)
            cached.flush()
            remote_info, cached_info = remote.info(), cached.info()
            assert (cached_info.samples_this_epoch, cached_info.correct_this_epoch) == (
                remote_info.samples_this_epoch,
                remote_info.correct_this_epoch,
            )
            remote.next_epoch()
            cached.next_epoch()
            # One upload per epoch, added to a zero accumulator: S is bit for bit the remote one.
            assert_same_s(cached.state(), remote.state(), exact=True)


def test_background_uploads_give_the_remote_s_up_to_summation_order(
    server: EmbeddedServer, client: lossd.Client, session_name: str
) -> None:
    remote_name, cached_name = names(session_name)
    with ols(server, remote_name) as remote, ols(server, cached_name, cached=True, upload_every=1) as cached:
        for epoch in range(EPOCHS):
            for i in range(STEPS):
                logits, labels = batch(100 * epoch + i)
                remote_loss, remote_grad = step(remote, logits, labels)
                cached_loss, cached_grad = step(cached, logits, labels)
                # Same S as the server's: equal bit for bit to the server's own loss on the cached session.
                served = client.compute_loss(cached_name, logits, labels, training=False, epoch=epoch)
                assert_equal(cached_loss, served.loss)
                assert served.grad is not None
                assert_equal(cached_grad, served.grad)
                # And to the remote mode up to the float32 rounding of S (exactly in epoch 0).
                tolerance = {"rtol": 0, "atol": 0} if epoch == 0 else {"rtol": 1e-5, "atol": 1e-7}
                torch.testing.assert_close(cached_loss, remote_loss, **tolerance)
                torch.testing.assert_close(cached_grad, remote_grad, **tolerance)
            remote.next_epoch()
            cached.next_epoch()
            assert_same_s(cached.state(), remote.state(), exact=False)


def run_ranks(work: Callable[[int], None], world_size: int = 2) -> None:
    errors: list[BaseException] = []

    def guarded(rank: int) -> None:
        try:
            work(rank)
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=guarded, args=(rank,)) for rank in range(world_size)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors, errors


Trace = dict[tuple[int, int, int], tuple[torch.Tensor, torch.Tensor]]


def train_ranks(
    server: EmbeddedServer, session: str, disjoint: bool, **kwargs: Any
) -> tuple[Trace, list[lossd.SessionState]]:
    """Two ranks on one session, each in its thread; rank r trains classes r, r+2, ... when ``disjoint``."""
    trace: Trace = {}
    states: list[lossd.SessionState] = []

    def work(rank: int) -> None:
        classes = range(rank, C, 2) if disjoint else range(C)
        with ols(server, session, world_size=2, rank=rank, **kwargs) as module:
            for epoch in range(EPOCHS):
                for i in range(STEPS):
                    trace[rank, epoch, i] = step(module, *batch(1000 * rank + 100 * epoch + i, classes))
                module.next_epoch()
                if rank == 0:
                    states.append(module.state())

    run_ranks(work)
    return trace, states


@pytest.mark.parametrize("disjoint", [True, False], ids=["disjoint-labels", "shared-labels"])
def test_two_ranks_sharing_a_session_cached_equals_remote(
    server: EmbeddedServer, session_name: str, disjoint: bool
) -> None:
    remote_name, cached_name = names(session_name)
    remote_trace, remote_states = train_ranks(server, remote_name, disjoint)
    # Disjoint labels: one upload per rank and epoch, each accumulator row from one rank, in its order.
    uploads = {"upload_every": None, "upload_seconds": None} if disjoint else {"upload_every": 2}
    cached_trace, cached_states = train_ranks(server, cached_name, disjoint, cached=True, **uploads)
    assert len(cached_states) == len(remote_states) == EPOCHS
    for cached_state, remote_state in zip(cached_states, remote_states, strict=True):
        assert_same_s(cached_state, remote_state, exact=disjoint, samples=False)
    for key, (remote_loss, remote_grad) in remote_trace.items():
        cached_loss, cached_grad = cached_trace[key]
        exact = disjoint or key[1] == 0
        tolerance = {"rtol": 0, "atol": 0} if exact else {"rtol": 1e-5, "atol": 1e-7}
        torch.testing.assert_close(cached_loss, remote_loss, **tolerance)
        torch.testing.assert_close(cached_grad, remote_grad, **tolerance)


# AddStatistics: exactly once, epoch tags, validation -----------------------------------------------


def upload_of(seeds: range) -> dict[str, Any]:
    """The statistics of ``seeds``' batches under the initial S, as a cached client accumulates them."""
    soft = LF.initial_soft_labels(C, 0.1)
    accumulator = torch.zeros((C, C), dtype=torch.float64)
    counts = torch.zeros(C, dtype=torch.int64)
    samples = correct = 0
    for seed in seeds:
        logits, labels = batch(seed)
        output = LF.online_label_smoothing(logits, labels, soft, alpha=0.5)
        rows, probs = LF.correct_rows(output, labels)
        accumulator.index_add_(0, rows, probs)
        counts.index_add_(0, rows, torch.ones_like(rows))
        samples, correct = samples + output.n_used, correct + output.n_correct
    classes = counts.nonzero().squeeze(1)
    return {
        "classes": classes,
        "rows": accumulator[classes],
        "counts": counts[classes],
        "samples": samples,
        "correct": correct,
    }


def test_an_upload_resent_with_the_same_id_counts_once(
    server: EmbeddedServer, client: lossd.Client, session_name: str
) -> None:
    client.create_session(session_name, ols_spec(C))
    upload = upload_of(range(3))
    first = client.add_statistics(session_name, epoch=0, request_id="upload-1", **upload)
    assert (first.samples_this_epoch, first.correct_this_epoch) == (upload["samples"], upload["correct"])
    with lossd.Client(server.target) as other:  # a resend may come on another connection
        again = other.add_statistics(session_name, epoch=0, request_id="upload-1", **upload)
    assert again == first  # the original answer
    state = client.get_state(session_name)
    assert state.samples_this_epoch == upload["samples"]
    assert_equal(state.accumulator.T[upload["classes"]], upload["rows"])  # reference layout: column k
    assert_equal(state.counts[upload["classes"]], upload["counts"])
    info = client.get_session(session_name)
    assert (info.samples_this_epoch, info.correct_this_epoch) == (upload["samples"], upload["correct"])
    # The same id with other statistics is refused, and a new id counts.
    with pytest.raises(lossd.InvalidArgumentError, match="upload-1"):
        client.add_statistics(session_name, epoch=0, request_id="upload-1", **upload_of(range(3, 4)))
    client.add_statistics(session_name, epoch=0, request_id="upload-2", **upload)
    assert client.get_session(session_name).samples_this_epoch == 2 * upload["samples"]


def test_an_upload_for_the_wrong_epoch_or_after_next_epoch_is_refused(client: lossd.Client, session_name: str) -> None:
    client.create_session(session_name, dataclasses.replace(ols_spec(C), world_size=2))
    upload = upload_of(range(2))
    with pytest.raises(lossd.FailedPreconditionError, match=r"epoch 0.*epoch 1"):
        client.add_statistics(session_name, epoch=1, request_id="early", **upload)
    # Rank 0 arrives at the barrier: its uploads for epoch 0 are closed, rank 1's are not.
    waiting = threading.Thread(target=lambda: client.next_epoch(session_name, 0, rank=0))
    waiting.start()
    deadline = time.monotonic() + 10
    while client.get_session(session_name).ranks_finished != (0,):
        assert time.monotonic() < deadline
        time.sleep(0.005)
    with pytest.raises(lossd.FailedPreconditionError, match="already called next_epoch"):
        client.add_statistics(session_name, epoch=0, rank=0, request_id="late", **upload)
    assert client.get_session(session_name).samples_this_epoch == 0
    client.add_statistics(session_name, epoch=0, rank=1, request_id="in-time", **upload)
    client.next_epoch(session_name, 0, rank=1)
    waiting.join(timeout=10)
    with pytest.raises(lossd.FailedPreconditionError, match="is at epoch 1"):
        client.add_statistics(session_name, epoch=0, rank=1, request_id="stale", **upload)
    assert client.get_session(session_name).samples_this_epoch == 0


def _tensor(value: torch.Tensor) -> pb.Tensor:
    return _codec.encode(value)


def _bad_requests() -> list[tuple[str, dict[str, Any], str]]:
    good = upload_of(range(2))
    rows, classes, counts = good["rows"], good["classes"], good["counts"]
    negative = rows.clone()
    negative[0, 0] = -1.0
    nan = rows.clone()
    nan[0, 0] = float("nan")
    off = rows.clone()
    off[0] *= 2
    empty = {
        "classes": _tensor(torch.zeros(0, dtype=torch.int64)),
        "rows": _tensor(torch.zeros((0, C), dtype=torch.float64)),
        "counts": _tensor(torch.zeros(0, dtype=torch.int64)),
    }
    return [
        ("class out of range", {"classes": _tensor(torch.full_like(classes, C))}, "classes: 10 is outside"),
        ("classes int32", {"classes": _tensor(classes.to(torch.int32))}, "classes: expected"),
        ("rows float32", {"rows": _tensor(rows.to(torch.float32))}, "rows: expected shape"),
        ("rows wrong shape", {"rows": _tensor(rows[:, :-1])}, "rows: expected shape"),
        ("rows NaN", {"rows": _tensor(nan)}, "rows: contains NaN"),
        ("rows negative", {"rows": _tensor(negative)}, "rows: negative"),
        ("rows not summing to counts", {"rows": _tensor(off)}, "rows: row 0"),
        ("rows bytes", {"rows": pb.Tensor(dtype=pb.DTYPE_FLOAT64, shape=[1, C], data=b"x")}, "rows: expected"),
        ("counts wrong shape", {"counts": _tensor(counts[:-1])}, "counts: expected shape"),
        ("counts negative", {"counts": _tensor(-counts)}, "counts: negative"),
        ("correct not sum(counts)", {"correct": good["correct"] + 1}, "correct: expected sum"),
        ("correct above samples", {"samples": good["correct"] - 1}, "correct: .* exceeds samples"),
        ("samples negative", {**empty, "samples": -1, "correct": 0}, "samples: expected >= 0"),
        # int64 counts whose sum wraps to a negative "correct": summed in Python ints, it does not match.
        (
            "counts overflowing",
            {
                "classes": _tensor(torch.tensor([0, 1])),
                "rows": _tensor(torch.eye(2, C, dtype=torch.float64) * 2.0**62),
                "counts": _tensor(torch.tensor([2**62, 2**62])),
                "samples": 0,
                "correct": -(2**63),
            },
            "correct: expected >= 0",
        ),
        ("no epoch", {"epoch": None}, "epoch: required"),
        ("no request id", {"request_id": ""}, "request_id: required"),
        ("no rows", {"rows": None}, "rows: required"),
        ("rank", {"rank": 2}, "rank"),
    ]


@pytest.mark.parametrize(
    ("fields", "match"), [case[1:] for case in _bad_requests()], ids=[c[0] for c in _bad_requests()]
)
def test_a_malformed_upload_is_refused_naming_the_field_and_changes_nothing(
    client: lossd.Client, stub: pb_grpc.LossServiceStub, session_name: str, fields: dict[str, Any], match: str
) -> None:
    client.create_session(session_name, ols_spec(C))
    client.add_statistics(session_name, epoch=0, request_id="before", **upload_of(range(5, 7)))
    before, info = client.get_state(session_name), client.get_session(session_name)
    good = upload_of(range(2))
    request = pb.StatisticsRequest(
        session=session_name,
        epoch=0,
        request_id="bad",
        classes=_tensor(good["classes"]),
        rows=_tensor(good["rows"]),
        counts=_tensor(good["counts"]),
        samples=good["samples"],
        correct=good["correct"],
    )
    for name, value in fields.items():
        if value is None:
            request.ClearField(name)  # type: ignore[arg-type]
        elif isinstance(value, pb.Tensor):
            getattr(request, name).CopyFrom(value)
        else:
            setattr(request, name, value)
    with pytest.raises(grpc.RpcError) as raised:
        stub.AddStatistics(request)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert re.search(match, raised.value.details()), raised.value.details()
    after = client.get_state(session_name)
    assert_equal(after.accumulator, before.accumulator)
    assert_equal(after.counts, before.counts)
    assert client.get_session(session_name).samples_this_epoch == info.samples_this_epoch
    assert client.get_session(session_name).correct_this_epoch == info.correct_this_epoch
    # A refused id applied nothing, so the good request may use it now.
    client.add_statistics(session_name, epoch=0, request_id="bad", **good)


def test_stateless_sessions_take_no_statistics(client: lossd.Client, session_name: str) -> None:
    client.create_session(session_name, lossd.SessionSpec(kind="cross_entropy", n_classes=C))
    with pytest.raises(lossd.InvalidArgumentError, match=r"session: .*cross_entropy"):
        client.add_statistics(session_name, epoch=0, request_id="x", **upload_of(range(1)))
    with pytest.raises(lossd.InvalidArgumentError, match=r"session: .*soft labels"):
        client.get_soft_labels(session_name)


# The module: asynchronous uploads, next_epoch, eval, errors ------------------------------------------------


class SlowUploads:
    """Counts AddStatistics calls made through lossd.Client and delays each one."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, delay: float) -> None:
        self.calls = 0
        self.applied = 0
        original = lossd.Client.add_statistics

        def slow(client: lossd.Client, *args: Any, **kwargs: Any) -> lossd.SessionInfo:
            self.calls += 1
            time.sleep(delay)
            info = original(client, *args, **kwargs)
            self.applied += 1
            return info

        monkeypatch.setattr(lossd.Client, "add_statistics", slow)


def test_uploads_run_in_the_background_and_next_epoch_waits_for_them(
    server: EmbeddedServer, monkeypatch: pytest.MonkeyPatch, session_name: str
) -> None:
    uploads = SlowUploads(monkeypatch, delay=0.5)
    remote_name, cached_name = names(session_name)
    with ols(server, remote_name) as remote, ols(server, cached_name, cached=True, upload_every=3) as cached:
        started = time.monotonic()
        for i in range(7):
            step(remote, *batch(i))
            step(cached, *batch(i))
        assert time.monotonic() - started < 0.5  # the training loop did not wait for any upload
        assert uploads.calls >= 1 and uploads.applied < 2  # 2 uploads cut after steps 3 and 6, in flight
        cached.next_epoch()  # uploads the 7th step and waits for all three before arriving
        assert uploads.applied == 3
        remote.next_epoch()
        assert_same_s(cached.state(), remote.state(), exact=False)


def test_uploads_every_t_seconds(server: EmbeddedServer, client: lossd.Client, session_name: str) -> None:
    with ols(server, session_name, cached=True, upload_every=None, upload_seconds=0.05) as cached:
        step(cached, *batch(0))
        assert client.get_session(session_name).samples_this_epoch == 0  # not yet due
        time.sleep(0.06)
        step(cached, *batch(1))  # due: both batches go
        deadline = time.monotonic() + 10
        while client.get_session(session_name).samples_this_epoch != 2 * N:
            assert time.monotonic() < deadline, "the upload never arrived"
            time.sleep(0.01)
        step(cached, *batch(2))  # not due again: stays here until flushed
        cached.flush()
        assert client.get_session(session_name).samples_this_epoch == 3 * N


def test_eval_mode_uploads_nothing(
    server: EmbeddedServer, client: lossd.Client, monkeypatch: pytest.MonkeyPatch, session_name: str
) -> None:
    uploads = SlowUploads(monkeypatch, delay=0)
    remote_name, cached_name = names(session_name)
    with ols(server, remote_name) as remote, ols(server, cached_name, cached=True, upload_every=1) as cached:
        remote.eval()
        cached.eval()
        with torch.no_grad():
            for i in range(3):
                logits, labels = batch(i)
                assert_equal(cached(logits, labels), remote(logits, labels))
        cached.flush()
        assert uploads.calls == 0
        info, state = client.get_session(cached_name), client.get_state(cached_name)
        assert (info.samples_this_epoch, info.correct_this_epoch) == (0, 0)
        assert not state.accumulator.any() and not state.counts.any()


def test_bad_inputs_fail_as_in_remote_mode_and_count_nothing(server: EmbeddedServer, session_name: str) -> None:
    with ols(server, session_name, cached=True, upload_every=1) as cached:
        logits, labels = batch(0)
        with pytest.raises(lossd.InvalidArgumentError, match="labels: 10 is outside"):
            cached(logits, torch.full_like(labels, C))
        nan = logits.clone()
        nan[0, 0] = float("nan")
        with pytest.raises(lossd.InvalidArgumentError, match="logits: contains NaN"):
            cached(nan, labels)
        cached.flush()
        assert cached.info().samples_this_epoch == 0


def test_a_module_left_behind_is_refused_like_in_remote_mode(server: EmbeddedServer, session_name: str) -> None:
    with ols(server, session_name, cached=True) as first, ols(server, session_name, cached=True) as second:
        step(first, *batch(0))
        step(second, *batch(1))
        first.next_epoch()  # finishes epoch 0 (world_size 1) with first's statistics only
        with pytest.raises(lossd.FailedPreconditionError):
            second.next_epoch()  # its upload is for the finished epoch: refused, not counted into epoch 1
        assert first.info().samples_this_epoch == 0


def test_a_copy_reconnects_without_the_originals_statistics(server: EmbeddedServer, session_name: str) -> None:
    with ols(server, session_name, cached=True, upload_every=None, upload_seconds=None) as cached:
        logits, labels = batch(0)
        loss, grad = step(cached, logits, labels)
        clone = copy.deepcopy(cached)
        try:
            assert clone.cached and clone._cache is None
            clone_loss, clone_grad = step(clone, logits, labels)
            assert_equal(clone_loss, loss)
            assert_equal(clone_grad, grad)
            clone.flush()
            assert cached.info().samples_this_epoch == N  # the clone's batch only
        finally:
            clone.close()
        cached.flush()
        assert cached.info().samples_this_epoch == 2 * N


# Durability -----------------------------------------------------------------------------------------


def test_uploaded_statistics_survive_a_restart_and_a_resend_is_not_recounted(tmp_path: Path) -> None:
    def settings() -> Settings:
        return Settings(
            host="127.0.0.1", port=0, device="cpu", workers=2, store="sqlite", state_dir=tmp_path, grace_seconds=1
        )

    upload = upload_of(range(4))
    with EmbeddedServer(settings()) as first, lossd.Client(first.target, retry_deadline=0) as client:
        client.create_session("run", ols_spec(C))
        client.add_statistics("run", epoch=0, request_id="upload-1", **upload)
        before = client.get_state("run")
    # Stopping snapshots every accumulator with the ids applied; the next server restores both.
    with EmbeddedServer(settings()) as second, lossd.Client(second.target, retry_deadline=0) as client:
        state = client.get_state("run")
        assert state.samples_this_epoch == upload["samples"]
        assert_equal(state.accumulator, before.accumulator)
        assert_equal(state.counts, before.counts)
        resent = client.add_statistics("run", epoch=0, request_id="upload-1", **upload)
        assert resent.samples_this_epoch == upload["samples"]  # applied before the restart: not again
        assert_equal(client.get_state("run").accumulator, before.accumulator)
        client.add_statistics("run", epoch=0, request_id="upload-2", **upload)
        assert client.get_session("run").samples_this_epoch == 2 * upload["samples"]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_a_cached_module_survives_kill_9_of_a_durable_server(tmp_path: Path) -> None:
    port = str(_free_port())
    served = Served(tmp_path, "--port", port, "--snapshot-seconds", "0.05")
    try:
        target = served.target
        reference = ols_spec(C)
        with lossd.OnlineLabelSmoothing(
            0.5, C, target=target, session="run", cached=True, upload_every=2, retry_deadline=30
        ) as cached:
            assert cached.spec == reference
            for i in range(4):
                step(cached, *batch(i))
            cached.flush()  # both uploads applied ...
            snapshot = cached.info()
            deadline = time.monotonic() + 10
            while cached.info().snapshot_at < snapshot.updated_at:  # ... and snapshotted (read after it)
                assert time.monotonic() < deadline, "no snapshot"
                time.sleep(0.02)
            served.kill()
            served = Served(tmp_path, "--port", port)
            for i in range(4, 6):  # S is cached: these steps need no server
                step(cached, *batch(i))
            cached.next_epoch()  # uploads the rest to the restarted server, which kept the first four batches
            expected = upload_of(range(6))
            accumulator = torch.zeros((C, C), dtype=torch.float64)
            counts = torch.zeros(C, dtype=torch.int64)
            accumulator[expected["classes"]] = expected["rows"]
            counts[expected["classes"]] = expected["counts"]
            soft = LF.next_soft_labels(accumulator, counts, LF.initial_soft_labels(C, 0.1))
            state = cached.state()
            assert state.epoch == 1
            torch.testing.assert_close(state.supervise, soft.T, rtol=S_RTOL, atol=S_ATOL)
    finally:
        served.kill()


# Backward: the gradient handed over, not copied ------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["f32", "f16"])
def test_backward_hands_over_its_gradient_and_a_retained_graph_gives_it_again(
    server: EmbeddedServer, session_name: str, dtype: torch.dtype
) -> None:
    """loss.backward() takes the computed gradient as .grad itself (no multiply by 1, no copy); a second
    backward through a retained graph, a scaled loss and per-sample losses still give what the math says."""
    logits, labels = batch(11)
    with ols(server, session_name, cached=True) as module, ols(server, session_name) as remote:
        module.eval(), remote.eval()  # the same S throughout
        leaf = logits.to(dtype, copy=True).requires_grad_()
        loss = module(leaf, labels)
        loss.backward(retain_graph=True)
        first = leaf.grad
        assert first is not None and first.dtype == dtype
        assert_equal(first, step(remote, logits.to(dtype), labels)[1])
        first = first.clone()
        loss.backward()  # the graph was retained: the gradient again, accumulated
        assert_equal(leaf.grad, first + first)
        for scale in (3.0, 2.0**-20):  # through grad_output (a GradScaler's factor, say) as the remote path does
            leaf.grad = None
            (module(leaf, labels) * scale).backward()
            expected_leaf = logits.to(dtype, copy=True).requires_grad_()
            (remote(expected_leaf, labels) * scale).backward()
            assert_equal(leaf.grad, expected_leaf.grad)
