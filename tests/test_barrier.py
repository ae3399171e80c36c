"""Ranks, epoch tags and the next_epoch barrier of a session shared by ``world_size`` workers.

Every wait here is on an observable server state (``ranks_finished``), never on a sleep.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch

import lossd
from lossd import functional as LF
from lossd_server.config import Settings
from lossd_server.embedded import EmbeddedServer

C = 6
N = 12
ALPHA, EPS = 0.5, 0.1


def ols_spec(world_size: int) -> lossd.SessionSpec:
    return lossd.SessionSpec(
        kind="online_label_smoothing", n_classes=C, smoothing=EPS, alpha=ALPHA, world_size=world_size
    )


def batch(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, C, (N,), generator=g)
    return torch.randn(N, C, generator=g) + 2.5 * torch.nn.functional.one_hot(labels, C), labels


def wait_until(predicate: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)


class Call(threading.Thread):
    """Runs one blocking call in the background and keeps its outcome."""

    def __init__(self, function: Callable[[], Any]) -> None:
        super().__init__(daemon=True)
        self._function = function
        self.result: Any = None
        self.error: BaseException | None = None
        self.start()

    def run(self) -> None:
        try:
            self.result = self._function()
        except BaseException as error:
            self.error = error

    def outcome(self, timeout: float = 10.0) -> Any:
        self.join(timeout)
        assert not self.is_alive(), "the call did not return"
        if self.error is not None:
            raise self.error
        return self.result


def next_epoch_call(client: lossd.Client, name: str, epoch: int, rank: int, **kwargs: Any) -> Call:
    return Call(lambda: client.next_epoch(name, epoch, rank=rank, **kwargs))


def ranks_finished(client: lossd.Client, name: str) -> tuple[int, ...]:
    return client.get_session(name).ranks_finished


def expected_supervise(batches: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """S after one epoch over ``batches`` (any order), from the float64 functional math; wire layout."""
    acc = torch.zeros(C, C, dtype=torch.float64)
    counts = torch.zeros(C, dtype=torch.int64)
    for logits, labels in batches:
        probs = torch.softmax(logits.double(), dim=1)
        correct = probs.argmax(1) == labels
        acc.index_add_(0, labels[correct], probs[correct])
        counts.index_add_(0, labels[correct], torch.ones_like(labels[correct]))
    initial = LF.initial_soft_labels(C, EPS, "label_smoothing", "off_target")
    return LF.next_soft_labels(acc, counts, initial, "keep").T


@pytest.fixture()
def shared(client: lossd.Client, session_name: str) -> Iterator[str]:
    client.create_session(session_name, ols_spec(3))
    yield session_name
    client.delete_session(session_name)


def test_world_size_defaults_to_one_and_is_part_of_the_spec(client: lossd.Client, session_name: str) -> None:
    info, _ = client.create_session(session_name, lossd.SessionSpec(kind="cross_entropy", n_classes=3))
    assert info.spec.world_size == 1 and info.ranks_finished == ()
    other = f"{session_name}-ols"
    assert client.create_session(other, ols_spec(4))[0].spec.world_size == 4
    with pytest.raises(lossd.AlreadyExistsError, match="world_size is 4, requested 2"):
        client.create_session(other, ols_spec(2))
    with pytest.raises(lossd.InvalidArgumentError, match="world_size"):
        client.create_session(f"{session_name}-bad", ols_spec(-1))


def test_an_early_rank_waits_and_the_last_one_finishes_the_epoch_for_all(client: lossd.Client, shared: str) -> None:
    batches = [batch(seed) for seed in range(6)]
    for step, (logits, labels) in enumerate(batches):
        client.compute_loss(shared, logits, labels, rank=step % 3, epoch=0)
    before = client.get_state(shared)

    early = [next_epoch_call(client, shared, 0, rank) for rank in (0, 1)]
    wait_until(lambda: ranks_finished(client, shared) == (0, 1), "ranks 0 and 1 to be recorded")
    assert all(call.is_alive() for call in early)  # still waiting for rank 2
    unchanged = client.get_state(shared)
    assert unchanged.epoch == 0 and torch.equal(unchanged.supervise, before.supervise)

    last = client.next_epoch(shared, 0, rank=2)
    answers = [call.outcome() for call in early]
    assert last.epoch == 1 and all(answer == last for answer in answers)  # one answer for every rank
    assert last.ranks_finished == () and last.samples_this_epoch == 0
    after = client.get_state(shared)
    assert after.epoch == 1 and not after.counts.any()
    torch.testing.assert_close(after.supervise, expected_supervise(batches).float(), rtol=0, atol=1e-7)


def test_a_missing_rank_makes_the_others_time_out_naming_it(client: lossd.Client, shared: str) -> None:
    waiting = [next_epoch_call(client, shared, 0, rank, timeout=0.8) for rank in (0, 2)]
    for call in waiting:
        with pytest.raises(lossd.DeadlineExceededError) as raised:
            call.outcome()
        message = raised.value.message
        assert "ranks [1] have not called it" in message and "2 of world_size=3" in message and repr(shared) in message
    info = client.get_session(shared)
    assert info.epoch == 0 and info.ranks_finished == (0, 2)  # the timed-out calls stay recorded
    # The straggler finally arrives: it completes the epoch at once, and a timed-out rank's
    # repeat gets the same answer.
    finished = client.next_epoch(shared, 0, rank=1, timeout=2)
    assert finished.epoch == 1
    assert client.next_epoch(shared, 0, rank=0, timeout=2) == finished


def test_repeated_calls_wait_once_and_never_advance_twice(client: lossd.Client, shared: str) -> None:
    twice = [next_epoch_call(client, shared, 0, rank=0) for _ in range(2)]
    wait_until(lambda: ranks_finished(client, shared) == (0,), "rank 0 to be recorded")
    rank1 = next_epoch_call(client, shared, 0, rank=1)
    wait_until(lambda: ranks_finished(client, shared) == (0, 1), "rank 1 to be recorded")
    assert all(call.is_alive() for call in [*twice, rank1])  # a repeat of rank 0 did not count as rank 2
    finished = client.next_epoch(shared, 0, rank=2)
    assert [call.outcome() for call in [*twice, rank1]] == [finished] * 3
    for rank in range(3):  # every rank's retry after the fact: same answer, no second advance
        assert client.next_epoch(shared, 0, rank=rank) == finished
    assert client.get_session(shared).epoch == 1


def test_ranks_outside_the_world_are_invalid_and_change_nothing(client: lossd.Client, shared: str) -> None:
    logits, labels = batch(1)
    for rank in (3, -1):
        with pytest.raises(lossd.InvalidArgumentError, match=rf"0 <= rank < world_size=3 but got {rank}"):
            client.next_epoch(shared, 0, rank=rank)
        with pytest.raises(lossd.InvalidArgumentError, match="world_size=3"):
            client.compute_loss(shared, logits, labels, rank=rank, epoch=0)
    info = client.get_session(shared)
    assert info.samples_this_epoch == 0 and info.ranks_finished == ()


def test_next_epoch_needs_the_epoch_when_ranks_share_the_session(client: lossd.Client, shared: str) -> None:
    with pytest.raises(lossd.InvalidArgumentError, match="epoch: required when world_size > 1"):
        client.next_epoch(shared, rank=0)
    assert client.get_session(shared).ranks_finished == ()


def test_a_request_for_another_epoch_is_refused_with_both_epochs(client: lossd.Client, shared: str) -> None:
    logits, labels = batch(2)
    for training in (True, False):
        with pytest.raises(
            lossd.FailedPreconditionError, match="is at epoch 0, but the request from rank 1 is for epoch 1"
        ):
            client.compute_loss(shared, logits, labels, rank=1, epoch=1, training=training)
    assert client.get_session(shared).samples_this_epoch == 0
    client.compute_loss(shared, logits, labels, rank=1, epoch=0)
    for rank in range(3):
        next_epoch_call(client, shared, 0, rank)
    wait_until(lambda: client.get_session(shared).epoch == 1, "the epoch to finish")
    before = client.get_state(shared)
    # A straggler from the finished epoch must not leak its statistics into the new one.
    with pytest.raises(
        lossd.FailedPreconditionError, match="is at epoch 1, but the request from rank 1 is for epoch 0"
    ):
        client.compute_loss(shared, logits, labels, rank=1, epoch=0)
    after = client.get_state(shared)
    assert after.samples_this_epoch == before.samples_this_epoch == 0 and not after.counts.any()


def test_a_rank_that_finished_the_epoch_may_not_train_in_it(client: lossd.Client, shared: str) -> None:
    logits, labels = batch(3)
    waiting = next_epoch_call(client, shared, 0, rank=0)
    wait_until(lambda: ranks_finished(client, shared) == (0,), "rank 0 to be recorded")
    # rank 0's own thread is blocked in next_epoch; another thread of that rank must not add statistics.
    with pytest.raises(lossd.FailedPreconditionError, match="rank 0 already called next_epoch for epoch 0"):
        client.compute_loss(shared, logits, labels, rank=0, epoch=0)
    client.compute_loss(shared, logits, labels, rank=0, epoch=0, training=False)  # eval counts nothing: allowed
    client.compute_loss(shared, logits, labels, rank=1, epoch=0)  # a rank still in the epoch trains on
    assert client.get_session(shared).samples_this_epoch == N
    rank1 = next_epoch_call(client, shared, 0, rank=1)
    assert client.next_epoch(shared, 0, rank=2).epoch == 1
    assert waiting.outcome().epoch == rank1.outcome().epoch == 1


@pytest.mark.parametrize("how", ["delete", "load_state"])
def test_waiting_ranks_are_released_when_the_session_goes_away(
    client: lossd.Client, session_name: str, how: str
) -> None:
    client.create_session(session_name, ols_spec(2))
    state = client.get_state(session_name)
    waiting = next_epoch_call(client, session_name, 0, rank=0)
    wait_until(lambda: ranks_finished(client, session_name) == (0,), "rank 0 to be recorded")
    if how == "delete":
        client.delete_session(session_name)
        with pytest.raises(lossd.NotFoundError, match="deleted while ranks waited"):
            waiting.outcome()
        return
    client.load_state(session_name, state)
    with pytest.raises(lossd.AbortedError, match=r"state of session .* was replaced"):
        waiting.outcome()
    assert client.get_session(session_name).ranks_finished == ()  # the barrier starts over
    client.delete_session(session_name)


def test_waiting_ranks_do_not_hold_the_workers() -> None:
    """Ranks in the barrier wait on the event loop: a one-worker server keeps computing losses."""
    settings = Settings(host="127.0.0.1", port=0, device="cpu", workers=1, grace_seconds=0)
    with EmbeddedServer(settings) as running, lossd.Client(running.target) as client:
        client.create_session("wide", ols_spec(4))
        client.create_session("other", lossd.SessionSpec(kind="cross_entropy", n_classes=C))
        waiting = [next_epoch_call(client, "wide", 0, rank) for rank in range(3)]
        wait_until(lambda: ranks_finished(client, "wide") == (0, 1, 2), "three ranks to wait")
        logits, labels = batch(4)
        assert client.compute_loss("other", logits, labels).n_used == N
        assert client.next_epoch("wide", 0, rank=3).epoch == 1
        assert all(call.outcome().epoch == 1 for call in waiting)


def test_stopping_the_server_releases_waiting_ranks_as_unavailable() -> None:
    settings = Settings(host="127.0.0.1", port=0, device="cpu", grace_seconds=10)
    server = EmbeddedServer(settings).start()
    try:
        with lossd.Client(server.target, retry_deadline=0) as client:
            client.create_session("s", ols_spec(2))
            waiting = next_epoch_call(client, "s", 0, rank=0)
            wait_until(lambda: ranks_finished(client, "s") == (0,), "rank 0 to be recorded")
            started = time.monotonic()
            server.stop()
            # Released at once (so the retry can go to the next server), not after the 10 s grace.
            assert time.monotonic() - started < 5
            with pytest.raises(lossd.UnavailableError, match="shutting down"):
                waiting.outcome()
    finally:
        server.stop()


def test_an_untagged_request_racing_next_epoch_is_counted_in_the_new_epoch(
    server: EmbeddedServer, client: lossd.Client, session_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The math runs outside the session lock; if the epoch ends meanwhile, the statistics
    must not mix epochs: the request is computed again against the new soft labels."""
    from lossd_server.session import Session

    client.create_session(session_name, ols_spec(1))
    warmup_logits, warmup_labels = batch(7)
    client.compute_loss(session_name, warmup_logits, warmup_labels)  # gives epoch 1 a non-initial S
    original = Session._forward
    raced = []

    def forward(self: Session, *args: Any) -> Any:
        if not raced:
            raced.append(True)
            ender = threading.Thread(target=self.arrive, args=(0, None))  # next_epoch, between the two locks
            ender.start()
            ender.join()
        return original(self, *args)

    monkeypatch.setattr(Session, "_forward", forward)
    logits, labels = batch(8)
    result = client.compute_loss(session_name, logits, labels)
    monkeypatch.undo()
    assert raced and result.epoch == 1
    info = client.get_session(session_name)
    assert info.epoch == 1 and info.samples_this_epoch == N
    # The loss is the one under epoch 1's soft labels, which differ from epoch 0's.
    evaluated = client.compute_loss(session_name, logits, labels, training=False)
    assert torch.equal(result.loss, evaluated.loss)
    initial = LF.initial_soft_labels(C, EPS, "label_smoothing", "off_target")
    assert not torch.equal(client.get_state(session_name).supervise, initial.T)
