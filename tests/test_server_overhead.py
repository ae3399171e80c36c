"""The server's per-request shortcuts outside the math give the answers the plain code gave:
the fingerprint string snapshots keep, and the one-pass finite and label checks."""

from __future__ import annotations

import json
import math
import threading
import uuid

import pytest
import torch

import lossd
from lossd import _codec
from lossd._exceptions import InvalidArgumentError
from lossd._spec import SessionSpec
from lossd.v1 import loss_service_pb2 as pb
from lossd_server.batch import decode_batch
from lossd_server.config import Settings
from lossd_server.embedded import EmbeddedServer
from lossd_server.servicer import _fingerprint
from lossd_server.session import Session
from tests.conftest import ols_spec

C = 7
SPEC = SessionSpec(kind="label_smoothing", n_classes=C, smoothing=0.1)


def loss_request(logits: torch.Tensor, labels: torch.Tensor) -> pb.LossRequest:
    return pb.LossRequest(logits=_codec.encode(logits), labels=_codec.encode(labels))


def test_fingerprint_is_the_string_snapshots_keep() -> None:
    request = loss_request(torch.zeros(4, C), torch.zeros(4, dtype=torch.int64))
    request.need_grad, request.epoch = True, 3
    assert _fingerprint(request, 112) == "[true,3,1,[4,7],112,4,[4]]"
    request.ClearField("epoch")
    expected = json.dumps([True, None, 1, [4, 7], 112, 4, [4]], separators=(",", ":"))
    assert _fingerprint(request, 112) == expected


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("at", [0, 37, 40 * C - 1])
def test_any_non_finite_logit_is_refused(dtype: torch.dtype, bad: float, at: int) -> None:
    logits = torch.randn(40, C).to(dtype)
    logits.view(-1)[at] = bad
    with pytest.raises(InvalidArgumentError, match="NaN or infinity"):
        decode_batch(loss_request(logits, torch.zeros(40, dtype=torch.int64)), SPEC)


def test_labels_out_of_range_are_refused_and_ignore_index_is_kept() -> None:
    logits = torch.randn(3, C)
    batch = decode_batch(loss_request(logits, torch.tensor([0, SPEC.ignore_index, C - 1])), SPEC)
    assert batch.labels.tolist() == [0, SPEC.ignore_index, C - 1]
    for bad in (C, -1):
        with pytest.raises(InvalidArgumentError, match=f"labels: {bad} is outside"):
            decode_batch(loss_request(logits, torch.tensor([0, bad, 1], dtype=torch.int32)), SPEC)
    empty = decode_batch(loss_request(torch.empty(0, C), torch.empty(0, dtype=torch.int64)), SPEC)
    assert empty.logits.shape == (0, C)


def test_inline_math_runs_small_stream_requests_on_the_event_loop_with_the_same_bytes(
    monkeypatch: pytest.MonkeyPatch, server: EmbeddedServer
) -> None:
    """--inline-math-bytes: a stream request with at most that many bytes of logits is computed on the
    event loop's thread, a bigger one (and every unary call) on a worker; the answers are the same bytes."""
    threads: list[str] = []
    compute = Session.compute

    def spy(self: Session, *args: object, **kwargs: object) -> object:
        threads.append(threading.current_thread().name)
        return compute(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(Session, "compute", spy)
    classes = 10
    small, big = (torch.randn(n, classes, generator=torch.Generator().manual_seed(n)) for n in (4, 64))
    settings = Settings(host="127.0.0.1", port=0, store="memory", grace_seconds=1, inline_math_bytes=4 * classes * 4)
    answers = {}
    with EmbeddedServer(settings) as inline_server:
        for name, target in (("inline", inline_server.target), ("workers", server.target)):
            with lossd.Client(target, transport="grpc") as client:  # the event loop serves only gRPC
                session = f"inline-{name}-{uuid.uuid4().hex}"
                client.create_session(session, ols_spec(classes))
                results = [
                    client.compute_loss(session, logits, torch.arange(len(logits)) % classes, stream=stream)
                    for logits, stream in ((small, True), (big, True), (small, False))
                ]
                client.delete_session(session)
            answers[name] = [(r.loss, r.grad, r.n_correct) for r in results]
    assert threads[0] == "lossd-embedded"  # the inline server's event loop
    assert all(name.startswith("lossd-math") for name in threads[1:])
    for (loss, grad, correct), (expected_loss, expected_grad, expected_correct) in zip(
        answers["inline"], answers["workers"], strict=True
    ):
        assert torch.equal(loss, expected_loss) and correct == expected_correct
        assert grad is not None and expected_grad is not None and torch.equal(grad, expected_grad)
