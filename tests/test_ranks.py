"""How a module learns its rank and world size, what it sends, and the client's retry policy."""

from __future__ import annotations

import threading

import pytest
import torch

import lossd
from lossd import _distributed
from lossd._retry import RetryPolicy
from lossd_server.embedded import EmbeddedServer


@pytest.fixture()
def no_torchrun(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    return monkeypatch


def fake_process_group(monkeypatch: pytest.MonkeyPatch, world_size: int, rank: int) -> None:
    monkeypatch.setattr(_distributed.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(_distributed.dist, "get_world_size", lambda: world_size)
    monkeypatch.setattr(_distributed.dist, "get_rank", lambda: rank)


def test_ranks_default_to_a_single_worker(no_torchrun: pytest.MonkeyPatch) -> None:
    assert _distributed.resolve_ranks(None, None) == (1, 0)


def test_ranks_come_from_torchrun_variables(no_torchrun: pytest.MonkeyPatch) -> None:
    no_torchrun.setenv("WORLD_SIZE", "4")
    no_torchrun.setenv("RANK", "3")
    assert _distributed.resolve_ranks(None, None) == (4, 3)
    no_torchrun.setenv("RANK", "four")
    with pytest.raises(ValueError, match="RANK='four' is not an integer"):
        _distributed.resolve_ranks(None, None)


def test_an_initialised_process_group_wins_over_the_variables(no_torchrun: pytest.MonkeyPatch) -> None:
    no_torchrun.setenv("WORLD_SIZE", "8")
    no_torchrun.setenv("RANK", "7")
    fake_process_group(no_torchrun, world_size=3, rank=1)
    assert _distributed.resolve_ranks(None, None) == (3, 1)
    assert _distributed.resolve_ranks(2, 0) == (2, 0)  # explicit arguments win over both


@pytest.mark.parametrize(("world_size", "rank"), [(2, None), (None, 0), (2, 2), (0, 0), (3, -1)])
def test_bad_explicit_ranks_are_refused(
    no_torchrun: pytest.MonkeyPatch, world_size: int | None, rank: int | None
) -> None:
    with pytest.raises(ValueError):
        _distributed.resolve_ranks(world_size, rank)


def test_a_distributed_module_needs_a_shared_session_name(
    server: EmbeddedServer, no_torchrun: pytest.MonkeyPatch
) -> None:
    fake_process_group(no_torchrun, world_size=2, rank=0)
    with pytest.raises(ValueError, match="name the session"):
        lossd.OnlineLabelSmoothing(0.5, 4, target=server.target)


def test_a_module_sends_its_rank_and_epoch(
    server: EmbeddedServer, client: lossd.Client, session_name: str, no_torchrun: pytest.MonkeyPatch
) -> None:
    no_torchrun.setenv("WORLD_SIZE", "2")
    no_torchrun.setenv("RANK", "1")
    logits, labels = torch.randn(6, 4), torch.tensor([0, 1, 2, 3, 0, 1])
    with lossd.OnlineLabelSmoothing(0.5, 4, session=session_name, target=server.target) as rank1:
        assert rank1.rank == 1 and rank1.spec.world_size == 2 and "rank=1/2" in repr(rank1)
        rank1(logits, labels)
        assert client.get_session(session_name).samples_this_epoch == 6
        # Rank 0 of the job is another process; here a plain client plays it.
        other = threading.Thread(target=client.next_epoch, args=(session_name, 0), kwargs={"rank": 0})
        other.start()
        rank1.next_epoch()  # rank 0 and rank 1 make the barrier complete
        other.join(10)
        assert rank1.epoch == 1 and client.get_session(session_name).epoch == 1
        # The module's requests carry its epoch: once the session moves on without it, it is refused.
        other = threading.Thread(target=client.next_epoch, args=(session_name, 1), kwargs={"rank": 0})
        other.start()
        assert client.next_epoch(session_name, 1, rank=1).epoch == 2
        other.join(10)
        with pytest.raises(
            lossd.FailedPreconditionError, match="is at epoch 2, but the request from rank 1 is for epoch 1"
        ):
            rank1(logits, labels)
    client.delete_session(session_name)


def test_stateless_modules_stay_single_worker(server: EmbeddedServer, no_torchrun: pytest.MonkeyPatch) -> None:
    fake_process_group(no_torchrun, world_size=4, rank=2)
    with lossd.CrossEntropyLoss(n_classes=3, target=server.target) as criterion:  # private: no barrier to join
        assert criterion.spec.world_size == 1 and criterion.rank == 0
        criterion(torch.randn(2, 3), torch.tensor([0, 2]))


def test_retry_policy_backs_off_until_the_deadline() -> None:
    policy = RetryPolicy(deadline=1.0, initial_backoff=0.1, max_backoff=0.4)
    pauses: list[float] = []
    clock = [0.0]

    def sleep(seconds: float) -> None:
        pauses.append(seconds)
        clock[0] += seconds

    attempts = [0]

    def attempt() -> str:
        attempts[0] += 1
        if attempts[0] < 4:
            raise lossd.UnavailableError("connection refused")
        return "ok"

    assert policy.run(attempt, "host:1", sleep=sleep) == "ok"
    assert attempts[0] == 4 and len(pauses) == 3
    # Each pause is the backoff (doubling, capped) times a jitter in [0.5, 1].
    for pause, backoff in zip(pauses, (0.1, 0.2, 0.4), strict=True):
        assert backoff * 0.5 <= pause <= backoff


def test_retry_policy_does_not_retry_other_errors() -> None:
    calls = [0]

    def attempt() -> None:
        calls[0] += 1
        raise lossd.InvalidArgumentError("bad")

    with pytest.raises(lossd.InvalidArgumentError):
        RetryPolicy(deadline=10).run(attempt, "host:1", sleep=lambda _: None)
    assert calls[0] == 1


def test_retry_policy_gives_up_naming_the_server_and_the_time() -> None:
    with pytest.raises(lossd.UnavailableError) as raised:
        RetryPolicy(deadline=0.2, initial_backoff=0.05).run(
            lambda: (_ for _ in ()).throw(lossd.UnavailableError("connection refused")), "trainer-host:50051"
        )
    message = raised.value.message
    assert "trainer-host:50051" in message and "after retrying for 0.2" in message and "connection refused" in message
    assert isinstance(raised.value.__cause__, lossd.UnavailableError)
