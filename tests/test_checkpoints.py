"""A run resumed from a trainer checkpoint resumes OLS exactly, on another server, in a new or existing session."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import lossd
from lossd_server.config import Settings
from lossd_server.embedded import EmbeddedServer

C = 6
OPTIONS = {"alpha": 0.4, "n_classes": C, "smoothing": 0.12}


def batches(count: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        labels = torch.randint(0, C, (24,), generator=generator)
        out.append((torch.randn(24, C, generator=generator) + 2 * F.one_hot(labels, C), labels))
    return out


@pytest.fixture()
def other_server(tmp_path: Path) -> Iterator[EmbeddedServer]:
    """A second server with its own store: the checkpoint has to carry everything."""
    settings = Settings(host="127.0.0.1", port=0, device="cpu", workers=2, store="sqlite", state_dir=tmp_path)
    with EmbeddedServer(settings) as running:
        yield running


def saved(module: torch.nn.Module) -> dict[str, object]:
    buffer = io.BytesIO()
    torch.save(module.state_dict(), buffer)
    buffer.seek(0)
    loaded: dict[str, object] = torch.load(buffer, weights_only=True)  # what a trainer's checkpoint gives back
    return loaded


def step(module: lossd.OnlineLabelSmoothing, logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, torch.Tensor]:
    leaf = logits.clone().requires_grad_()
    loss = module(leaf, labels)
    loss.backward()
    assert leaf.grad is not None
    return float(loss.detach()), leaf.grad


@pytest.mark.parametrize("into", ["new", "existing"])
def test_a_checkpoint_resumes_bit_identically_on_a_fresh_server(
    server: EmbeddedServer, other_server: EmbeddedServer, into: str
) -> None:
    data = batches(10, seed=5)
    with lossd.OnlineLabelSmoothing(**OPTIONS, target=server.target) as original:
        for logits, labels in data[:3]:
            original(logits, labels)
        original.next_epoch()
        for logits, labels in data[3:5]:  # mid-epoch: S, accumulator and counts all matter
            original(logits, labels)
        checkpoint = saved(original)
        assert checkpoint["_extra_state"] == {"format": 1, "spec": original.spec.__dict__}

        session = "resumed" if into == "existing" else None
        with lossd.OnlineLabelSmoothing(**OPTIONS, target=other_server.target, session=session) as resumed:
            if into == "existing":  # the session exists, with progress of its own that the checkpoint replaces
                resumed(*data[0])
            result = resumed.load_state_dict(checkpoint, strict=True)
            assert not result.missing_keys and not result.unexpected_keys
            assert resumed.epoch == original.epoch == 1
            for logits, labels in data[5:]:
                loss_a, grad_a = step(original, logits, labels)
                loss_b, grad_b = step(resumed, logits, labels)
                assert loss_a == loss_b
                assert torch.equal(grad_a, grad_b)
            original.next_epoch()
            resumed.next_epoch()
            a, b = original.state(), resumed.state()
            assert a.epoch == b.epoch == 2
            assert torch.equal(a.supervise, b.supervise)
            assert torch.equal(a.accumulator, b.accumulator) and torch.equal(a.counts, b.counts)


def test_a_checkpoint_of_another_spec_is_refused_and_changes_nothing(server: EmbeddedServer) -> None:
    with lossd.OnlineLabelSmoothing(**OPTIONS, target=server.target) as original:
        original(*batches(1, seed=6)[0])
        checkpoint = saved(original)
    with lossd.OnlineLabelSmoothing(**{**OPTIONS, "alpha": 0.9}, target=server.target) as other:
        before = other.state()
        with pytest.raises(RuntimeError, match=r"alpha=0\.4 \(this module: 0\.9\)"):
            other.load_state_dict(checkpoint)
        after = other.state()
        assert torch.equal(before.supervise, after.supervise) and torch.equal(before.counts, after.counts)


def test_a_state_that_does_not_fit_the_spec_is_invalid_argument(server: EmbeddedServer) -> None:
    with lossd.OnlineLabelSmoothing(**OPTIONS, target=server.target) as original:
        checkpoint = saved(original)
    checkpoint.pop("_extra_state")  # as a hand-made or reference checkpoint would be
    checkpoint["supervise"] = torch.zeros(C + 1, C + 1)
    with (
        lossd.OnlineLabelSmoothing(**OPTIONS, target=server.target) as other,
        pytest.raises(lossd.InvalidArgumentError, match=r"state\.supervise: expected shape \[6, 6\]"),
    ):
        other.load_state_dict(checkpoint)
