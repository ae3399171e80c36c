"""Every bad input gets its gRPC status, a message naming the field, and leaves the session unchanged.

The stateful case is an online_label_smoothing session with non-trivial statistics
(training batches, one next_epoch, more training batches), so any partial update made
before a request is rejected shows up in ``get_state`` / ``get_session``.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
import torch

import lossd
from lossd import _codec
from lossd._exceptions import from_rpc_error, from_status, status_code
from lossd.v1 import loss_service_pb2 as pb
from lossd.v1 import loss_service_pb2_grpc as pb_grpc
from lossd_server import servicer as servicer_module
from lossd_server.config import Settings
from lossd_server.embedded import EmbeddedServer
from lossd_server.replay import ID_ENTRY_BYTES
from lossd_server.session import Session

C = 5
N = 8
OLS_SPEC = lossd.SessionSpec(kind="online_label_smoothing", n_classes=C, smoothing=0.1, alpha=0.5)
INVALID = grpc.StatusCode.INVALID_ARGUMENT


def embedded_settings(**overrides: Any) -> Settings:
    return Settings(host="127.0.0.1", port=0, device="cpu", workers=2, grace_seconds=0, **overrides)


def unique(prefix: str = "v") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


# Data --------------------------------------------------------------------------


def batch(seed: int, n: int = N, c: int = C) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic logits that mostly (not always) predict their label."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, c, (n,), generator=generator)
    logits = torch.randn(n, c, generator=generator) + 2.0 * torch.nn.functional.one_hot(labels, c).float()
    return logits, labels


GOOD_LOGITS, GOOD_LABELS = batch(1234)


def good_request(session: str, *, training: bool = False, request_id: str = "good") -> pb.LossRequest:
    return pb.LossRequest(
        session=session,
        logits=_codec.encode(GOOD_LOGITS),
        labels=_codec.encode(GOOD_LABELS),
        training=training,
        need_grad=True,
        request_id=request_id,
    )


def train(client: lossd.Client, name: str, seeds: range) -> None:
    for seed in seeds:
        logits, labels = batch(seed)
        client.compute_loss(name, logits, labels, training=True, stream=False)


def make_trained(client: lossd.Client, name: str, spec: lossd.SessionSpec = OLS_SPEC) -> None:
    """A session at epoch 1 with updated soft labels and statistics pending in the current epoch."""
    _, created = client.create_session(name, spec)
    assert created
    initial = client.get_state(name)
    train(client, name, range(3))
    client.next_epoch(name, epoch=0)
    train(client, name, range(10, 13))
    state = client.get_state(name)
    assert state.epoch == 1
    assert state.samples_this_epoch == 3 * N
    assert int(state.counts.sum()) > 0
    assert bool((state.accumulator != 0).any())
    assert not torch.equal(state.supervise, initial.supervise)


# Snapshots ---------------------------------------------------------------------


@dataclass(frozen=True)
class Snapshot:
    state: lossd.SessionState
    info: lossd.SessionInfo


def snapshot(client: lossd.Client, name: str) -> Snapshot:
    return Snapshot(client.get_state(name), client.get_session(name))


def assert_unchanged(client: lossd.Client, name: str, before: Snapshot) -> None:
    after = snapshot(client, name)
    assert after.state.epoch == before.state.epoch
    assert after.state.samples_this_epoch == before.state.samples_this_epoch
    for field in ("supervise", "accumulator", "counts"):
        old, new = getattr(before.state, field), getattr(after.state, field)
        assert old.dtype == new.dtype, field
        assert torch.equal(old, new), f"state.{field} changed"
    # Epoch, counters, spec and updated_at. Not snapshot_at: the durable store's timer may snapshot the
    # session's earlier, valid batches in between, which the refused request has no part in.
    assert dataclasses.replace(after.info, snapshot_at=0.0) == dataclasses.replace(before.info, snapshot_at=0.0)


def assert_error(error: lossd.LossdError, cls: type[lossd.LossdError], *needles: str) -> None:
    assert type(error) is cls, f"{type(error).__name__}: {error.message}"
    assert isinstance(error, lossd.LossdError)
    assert error.code is cls.code
    for needle in needles:
        assert needle in error.message, f"{needle!r} not in {error.message!r}"


# Fixtures ----------------------------------------------------------------------


@pytest.fixture()
def trained(client: lossd.Client, session_name: str) -> str:
    make_trained(client, session_name)
    return session_name


@pytest.fixture()
def channel(server: EmbeddedServer) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(server.target) as opened:
        yield opened


@pytest.fixture()
def stub(channel: grpc.Channel) -> pb_grpc.LossServiceStub:
    return pb_grpc.LossServiceStub(channel)


def call_raw(method: Callable[..., Any], request: Any) -> Any:
    """A unary call on the raw stub, failing with the client's typed exception."""
    try:
        return method(request, timeout=10)
    except grpc.RpcError as error:
        raise from_rpc_error(error) from error


def stream_raw(stub: pb_grpc.LossServiceStub, requests: list[pb.LossRequest]) -> list[pb.LossResponse]:
    return list(stub.LossStream(iter(requests), timeout=10))


# INVALID_ARGUMENT: bad loss requests -------------------------------------------


def _labels(n: int = N) -> torch.Tensor:
    return torch.arange(n) % C


BAD_TENSORS: dict[str, tuple[Callable[[], tuple[torch.Tensor, torch.Tensor]], tuple[str, ...]]] = {
    "logits-1d": (lambda: (torch.randn(C), torch.tensor([1])), ("logits", "shape")),
    "logits-3d": (lambda: (torch.randn(N, 2, C), _labels()), ("logits", "shape")),
    "logits-wrong-C": (lambda: (torch.randn(N, C + 1), _labels()), ("logits", "shape", f"[N, {C}]")),
    "logits-too-few-C": (lambda: (torch.randn(N, C - 1), _labels()), ("logits", "shape")),
    "logits-int64": (lambda: (torch.ones(N, C, dtype=torch.int64), _labels()), ("logits", "int64")),
    "logits-int32": (lambda: (torch.ones(N, C, dtype=torch.int32), _labels()), ("logits", "int32")),
    "labels-float": (lambda: (torch.randn(N, C), _labels().float()), ("labels", "float32")),
    "labels-too-long": (lambda: (torch.randn(N, C), _labels(N + 1)), ("labels", "shape")),
    "labels-too-short": (lambda: (torch.randn(N, C), _labels(N - 1)), ("labels", "shape")),
    "labels-2d": (lambda: (torch.randn(N, C), _labels().reshape(N, 1)), ("labels", "shape")),
    "label-equals-C": (lambda: (torch.randn(N, C), torch.tensor([0, 1, 2, C, 0, 1, 2, 3])), ("labels", str(C))),
    "label-minus-1": (lambda: (torch.randn(N, C), torch.tensor([0, 1, -1, 3, 0, 1, 2, 3])), ("labels", "-1")),
    "label-int32-out-of-range": (
        lambda: (torch.randn(N, C), torch.tensor([0, 1, 2, 3, 0, 1, 2, 99], dtype=torch.int32)),
        ("labels", "99"),
    ),
    "logits-nan": (
        lambda: (torch.randn(N, C).index_put_((torch.tensor(3), torch.tensor(2)), torch.tensor(math.nan)), _labels()),
        ("logits", "NaN"),
    ),
    "logits-inf": (
        lambda: (torch.randn(N, C).index_put_((torch.tensor(0), torch.tensor(0)), torch.tensor(math.inf)), _labels()),
        ("logits", "infinity"),
    ),
    "logits-neg-inf": (
        lambda: (torch.randn(N, C).index_put_((torch.tensor(7), torch.tensor(4)), torch.tensor(-math.inf)), _labels()),
        ("logits", "infinity"),
    ),
    "logits-nan-float64": (lambda: (torch.full((N, C), math.nan, dtype=torch.float64), _labels()), ("logits", "NaN")),
    "logits-inf-float16": (
        lambda: (
            torch.randn(N, C).half().index_put_((torch.tensor(1),), torch.tensor(math.inf, dtype=torch.float16)),
            _labels(),
        ),
        ("logits", "infinity"),
    ),
}


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "unary"])
@pytest.mark.parametrize("case", list(BAD_TENSORS))
def test_bad_loss_request_is_invalid_argument_and_changes_nothing(
    client: lossd.Client, trained: str, case: str, stream: bool
) -> None:
    make, needles = BAD_TENSORS[case]
    logits, labels = make()
    before = snapshot(client, trained)
    with pytest.raises(lossd.InvalidArgumentError) as excinfo:
        client.compute_loss(trained, logits, labels, training=True, stream=stream)
    assert_error(excinfo.value, lossd.InvalidArgumentError, *needles)
    assert_unchanged(client, trained, before)


def test_ignore_index_labels_are_accepted_while_other_negatives_are_not(
    client: lossd.Client, session_name: str
) -> None:
    """Positive control for the label range checks, with a custom ignore_index."""
    spec = lossd.SessionSpec(kind="online_label_smoothing", n_classes=C, alpha=0.5, ignore_index=-1)
    client.create_session(session_name, spec)
    logits = torch.randn(4, C)
    result = client.compute_loss(session_name, logits, torch.tensor([0, -1, 2, -1]), training=True)
    assert result.n_used == 2
    before = snapshot(client, session_name)
    with pytest.raises(lossd.InvalidArgumentError) as excinfo:
        client.compute_loss(session_name, logits, torch.tensor([0, -100, 2, 1]), training=True)
    assert_error(excinfo.value, lossd.InvalidArgumentError, "labels", "-100", "ignore_index (-1)")
    assert_unchanged(client, session_name, before)


def _mutate(request: pb.LossRequest, case: str) -> None:
    if case == "logits-bytes-short":
        request.logits.data = request.logits.data[:-4]
    elif case == "logits-bytes-long":
        request.logits.data = request.logits.data + b"\0" * 4
    elif case == "labels-bytes-short":
        request.labels.data = request.labels.data[:-8]
    elif case == "labels-bytes-long":
        request.labels.data = request.labels.data + b"\0" * 8
    elif case == "logits-dtype-relabelled":  # float16 over float32 bytes: twice the bytes the shape needs
        request.logits.dtype = pb.DTYPE_FLOAT16
    elif case == "logits-shape-not-matching-bytes":
        del request.logits.shape[:]
        request.logits.shape.extend([N + 1, C])
    elif case == "logits-negative-dim":
        del request.logits.shape[:]
        request.logits.shape.extend([-N, C])
    elif case == "logits-dtype-unknown":
        request.logits.dtype = 99  # type: ignore[assignment]
    elif case == "logits-dtype-unspecified":
        request.logits.dtype = pb.DTYPE_UNSPECIFIED
    elif case == "labels-dtype-unknown":
        request.labels.dtype = 42  # type: ignore[assignment]
    elif case == "missing-logits":
        request.ClearField("logits")
    elif case == "missing-labels":
        request.ClearField("labels")
    else:  # pragma: no cover
        raise AssertionError(case)


RAW_CASES: dict[str, tuple[str, ...]] = {
    "logits-bytes-short": ("logits", "bytes"),
    "logits-bytes-long": ("logits", "bytes"),
    "labels-bytes-short": ("labels", "bytes"),
    "labels-bytes-long": ("labels", "bytes"),
    "logits-dtype-relabelled": ("logits", "bytes"),
    "logits-shape-not-matching-bytes": ("logits", "bytes"),
    "logits-negative-dim": ("logits", "negative"),
    "logits-dtype-unknown": ("logits", "dtype", "99"),
    "logits-dtype-unspecified": ("logits", "dtype"),
    "labels-dtype-unknown": ("labels", "dtype", "42"),
    "missing-logits": ("logits", "required"),
    "missing-labels": ("labels", "required"),
}


@pytest.mark.parametrize("case", list(RAW_CASES))
def test_malformed_wire_tensor_unary(
    client: lossd.Client, stub: pb_grpc.LossServiceStub, trained: str, case: str
) -> None:
    request = good_request(trained, training=True, request_id=case)
    _mutate(request, case)
    before = snapshot(client, trained)
    with pytest.raises(lossd.InvalidArgumentError) as excinfo:
        call_raw(stub.ComputeLoss, request)
    assert_error(excinfo.value, lossd.InvalidArgumentError, *RAW_CASES[case])
    assert isinstance(excinfo.value.__cause__, grpc.RpcError)
    assert excinfo.value.__cause__.code() is INVALID  # type: ignore[attr-defined]
    assert_unchanged(client, trained, before)


@pytest.mark.parametrize("case", list(RAW_CASES))
def test_malformed_wire_tensor_stream_reports_in_band_and_keeps_the_stream(
    client: lossd.Client, stub: pb_grpc.LossServiceStub, trained: str, case: str
) -> None:
    baseline = client.compute_loss(trained, GOOD_LOGITS, GOOD_LABELS, training=False, stream=False)
    bad = good_request(trained, training=True, request_id=f"bad-{case}")
    _mutate(bad, case)
    before = snapshot(client, trained)
    responses = stream_raw(stub, [bad, good_request(trained, request_id="after")])
    assert len(responses) == 2
    failed, after = responses
    assert failed.request_id == f"bad-{case}"
    assert failed.HasField("error")
    assert not failed.HasField("loss") and not failed.HasField("grad")
    assert status_code(failed.error.code) is INVALID
    assert_error(
        from_status(status_code(failed.error.code), failed.error.message), lossd.InvalidArgumentError, *RAW_CASES[case]
    )
    assert after.request_id == "after" and not after.HasField("error")
    assert torch.equal(_codec.decode(after.loss), baseline.loss)
    assert_unchanged(client, trained, before)


def test_stream_survives_a_sequence_of_bad_requests(client: lossd.Client, trained: str) -> None:
    baseline = client.compute_loss(trained, GOOD_LOGITS, GOOD_LABELS, training=False, stream=True)
    opened = client._open_stream()
    assert opened is not None and opened.usable
    before = snapshot(client, trained)
    bad_inputs = [
        (torch.randn(N, C + 1), _labels()),
        (torch.randn(N, C), _labels().float()),
        (torch.full((N, C), math.nan), _labels()),
        (torch.randn(N, C), torch.full((N,), C)),
    ]
    for logits, labels in bad_inputs:
        with pytest.raises(lossd.InvalidArgumentError):
            client.compute_loss(trained, logits, labels, training=True, stream=True)
        again = client.compute_loss(trained, GOOD_LOGITS, GOOD_LABELS, training=False, stream=True)
        assert torch.equal(again.loss, baseline.loss)
        assert again.grad is not None and baseline.grad is not None and torch.equal(again.grad, baseline.grad)
        # The same stream answered: the error was in-band, not a torn-down call.
        assert client._open_stream() is opened and opened.usable
    with pytest.raises(lossd.NotFoundError):
        client.compute_loss(unique("missing"), GOOD_LOGITS, GOOD_LABELS, stream=True)
    assert client._open_stream() is opened and opened.usable
    assert_unchanged(client, trained, before)
    # And a training request on the same stream still updates the statistics.
    client.compute_loss(trained, GOOD_LOGITS, GOOD_LABELS, training=True, stream=True)
    assert client.get_state(trained).samples_this_epoch == before.state.samples_this_epoch + N


# INVALID_ARGUMENT: bad specs at CreateSession --------------------------------------

SPEC_CASES: dict[str, tuple[lossd.SessionSpec, tuple[str, ...]]] = {
    "n_classes-1": (lossd.SessionSpec(kind="cross_entropy", n_classes=1), ("spec.n_classes", "1")),
    "n_classes-0": (lossd.SessionSpec(kind="label_smoothing", n_classes=0, smoothing=0.1), ("spec.n_classes",)),
    "n_classes-negative": (
        lossd.SessionSpec(kind="online_label_smoothing", n_classes=-3, alpha=0.5),
        ("spec.n_classes", "-3"),
    ),
    "n_classes-huge": (lossd.SessionSpec(kind="cross_entropy", n_classes=(1 << 24) + 1), ("spec.n_classes",)),
    "smoothing-negative": (
        lossd.SessionSpec(kind="label_smoothing", n_classes=C, smoothing=-0.1),
        ("spec.smoothing", "-0.1"),
    ),
    "smoothing-one": (lossd.SessionSpec(kind="label_smoothing", n_classes=C, smoothing=1.0), ("spec.smoothing",)),
    "smoothing-above-one": (
        lossd.SessionSpec(kind="online_label_smoothing", n_classes=C, smoothing=1.5, alpha=0.5),
        ("spec.smoothing",),
    ),
    "smoothing-nan": (
        lossd.SessionSpec(kind="label_smoothing", n_classes=C, smoothing=math.nan),
        ("spec.smoothing", "nan"),
    ),
    "smoothing-inf": (lossd.SessionSpec(kind="label_smoothing", n_classes=C, smoothing=math.inf), ("spec.smoothing",)),
    "alpha-negative": (
        lossd.SessionSpec(kind="online_label_smoothing", n_classes=C, alpha=-0.1),
        ("spec.alpha", "-0.1"),
    ),
    "alpha-above-one": (
        lossd.SessionSpec(kind="online_label_smoothing", n_classes=C, alpha=1.01),
        ("spec.alpha", "1.01"),
    ),
    "alpha-nan": (lossd.SessionSpec(kind="online_label_smoothing", n_classes=C, alpha=math.nan), ("spec.alpha",)),
    "alpha-missing-for-ols": (
        lossd.SessionSpec(kind="online_label_smoothing", n_classes=C, smoothing=0.1),
        ("spec.alpha", "required"),
    ),
    "alpha-for-label-smoothing": (
        lossd.SessionSpec(kind="label_smoothing", n_classes=C, smoothing=0.1, alpha=0.5),
        ("spec.alpha",),
    ),
    "alpha-for-cross-entropy": (lossd.SessionSpec(kind="cross_entropy", n_classes=C, alpha=0.0), ("spec.alpha",)),
    "init-for-label-smoothing": (
        lossd.SessionSpec(kind="label_smoothing", n_classes=C, smoothing=0.1, init="uniform"),
        ("spec.init",),
    ),
    "init-for-cross-entropy": (lossd.SessionSpec(kind="cross_entropy", n_classes=C, init="zeros"), ("spec.init",)),
    "empty-class-for-cross-entropy": (
        lossd.SessionSpec(kind="cross_entropy", n_classes=C, empty_class="zero"),
        ("spec.empty_class",),
    ),
    "empty-class-for-label-smoothing": (
        lossd.SessionSpec(kind="label_smoothing", n_classes=C, empty_class="uniform"),
        ("spec.empty_class",),
    ),
    "cross-entropy-with-smoothing": (
        lossd.SessionSpec(kind="cross_entropy", n_classes=C, smoothing=0.1),
        ("spec.smoothing", "cross_entropy"),
    ),
    "weight-too-short": (
        lossd.SessionSpec(kind="cross_entropy", n_classes=C, weight=(1.0,) * (C - 1)),
        ("spec.weight", "shape", f"[{C}]"),
    ),
    "weight-too-long": (
        lossd.SessionSpec(kind="online_label_smoothing", n_classes=C, alpha=0.5, weight=(1.0,) * (C + 1)),
        ("spec.weight", "shape"),
    ),
    "weight-nan": (
        lossd.SessionSpec(kind="label_smoothing", n_classes=C, smoothing=0.1, weight=(1.0, math.nan, 1.0, 1.0, 1.0)),
        ("spec.weight", "NaN"),
    ),
    "weight-inf": (
        lossd.SessionSpec(kind="cross_entropy", n_classes=C, weight=(1.0, 1.0, 1.0, 1.0, math.inf)),
        ("spec.weight", "infinity"),
    ),
    "kind-unspecified": (lossd.SessionSpec(kind=None, n_classes=C), ("spec.kind", "required")),  # type: ignore[arg-type]
}


@pytest.mark.parametrize("case", list(SPEC_CASES))
def test_bad_spec_is_invalid_argument_and_creates_nothing(client: lossd.Client, session_name: str, case: str) -> None:
    spec, needles = SPEC_CASES[case]
    with pytest.raises(lossd.InvalidArgumentError) as excinfo:
        client.create_session(session_name, spec)
    assert_error(excinfo.value, lossd.InvalidArgumentError, *needles)
    with pytest.raises(lossd.NotFoundError):
        client.get_session(session_name)
    assert session_name not in {s.name for s in client.list_sessions()}


def _raw_spec(case: str) -> pb.SessionSpec:
    spec = pb.SessionSpec(kind=pb.LOSS_KIND_CROSS_ENTROPY, n_classes=C)
    if case == "kind-unknown":
        spec.kind = 99  # type: ignore[assignment]
    elif case == "kind-unspecified":
        spec.kind = pb.LOSS_KIND_UNSPECIFIED
    elif case == "convention-unknown":
        spec.convention = 7  # type: ignore[assignment]
    elif case == "reduction-unknown":
        spec.reduction = 9  # type: ignore[assignment]
    elif case == "init-unknown":
        spec.kind = pb.LOSS_KIND_ONLINE_LABEL_SMOOTHING
        spec.alpha = 0.5
        spec.init = 11  # type: ignore[assignment]
    elif case == "empty-class-unknown":
        spec.kind = pb.LOSS_KIND_ONLINE_LABEL_SMOOTHING
        spec.alpha = 0.5
        spec.empty_class = 12  # type: ignore[assignment]
    elif case == "weight-int":
        spec.weight.CopyFrom(_codec.encode(torch.ones(C, dtype=torch.int64)))
    elif case == "weight-bytes-short":
        spec.weight.CopyFrom(_codec.encode(torch.ones(C)))
        spec.weight.data = spec.weight.data[:-1]
    elif case == "weight-2d":
        spec.weight.CopyFrom(_codec.encode(torch.ones(1, C)))
    else:  # pragma: no cover
        raise AssertionError(case)
    return spec


RAW_SPEC_CASES: dict[str, tuple[str, ...]] = {
    "kind-unknown": ("spec.kind", "99"),
    "kind-unspecified": ("spec.kind",),
    "convention-unknown": ("spec.convention", "7"),
    "reduction-unknown": ("spec.reduction", "9"),
    "init-unknown": ("spec.init", "11"),
    "empty-class-unknown": ("spec.empty_class", "12"),
    "weight-int": ("spec.weight", "int64"),
    "weight-bytes-short": ("spec.weight", "bytes"),
    "weight-2d": ("spec.weight", "shape"),
}


@pytest.mark.parametrize("case", list(RAW_SPEC_CASES))
def test_bad_wire_spec_is_invalid_argument(
    client: lossd.Client, stub: pb_grpc.LossServiceStub, session_name: str, case: str
) -> None:
    request = pb.CreateSessionRequest(name=session_name, spec=_raw_spec(case))
    with pytest.raises(lossd.InvalidArgumentError) as excinfo:
        call_raw(stub.CreateSession, request)
    assert_error(excinfo.value, lossd.InvalidArgumentError, *RAW_SPEC_CASES[case])
    with pytest.raises(lossd.NotFoundError):
        client.get_session(session_name)


BAD_NAMES = {
    "empty": "",
    "space": "has space",
    "only-space": " ",
    "leading-space": " lead",
    "trailing-newline": "name\n",
    "leading-dash": "-dash",
    "leading-dot": ".hidden",
    "too-long": "x" * 257,
    "non-ascii": "caf\u00e9",
}


@pytest.mark.parametrize("case", list(BAD_NAMES))
def test_bad_session_name_is_invalid_argument(client: lossd.Client, case: str) -> None:
    name = BAD_NAMES[case]
    before = {s.name for s in client.list_sessions()}
    with pytest.raises(lossd.InvalidArgumentError) as excinfo:
        client.create_session(name, OLS_SPEC)
    assert_error(excinfo.value, lossd.InvalidArgumentError, "name")
    assert {s.name for s in client.list_sessions()} == before


def test_longest_valid_name_is_accepted(client: lossd.Client) -> None:
    """Positive control for the too-long case: 256 characters is the limit, not 255."""
    name = "x" * 244 + uuid.uuid4().hex[:12]
    assert len(name) == 256
    info, created = client.create_session(name, OLS_SPEC)
    assert created and info.name == name
    client.delete_session(name)


# NOT_FOUND -----------------------------------------------------------------------


def _zero_state(c: int = C) -> lossd.SessionState:
    return lossd.SessionState(
        epoch=0,
        supervise=torch.zeros(c, c),
        accumulator=torch.zeros(c, c, dtype=torch.float64),
        counts=torch.zeros(c, dtype=torch.int64),
    )


NOT_FOUND_CALLS: dict[str, Callable[[lossd.Client, str], object]] = {
    "GetSession": lambda client, name: client.get_session(name),
    "DeleteSession": lambda client, name: client.delete_session(name),
    "ComputeLoss": lambda client, name: client.compute_loss(name, GOOD_LOGITS, GOOD_LABELS, stream=False),
    "LossStream": lambda client, name: client.compute_loss(name, GOOD_LOGITS, GOOD_LABELS, stream=True),
    "NextEpoch": lambda client, name: client.next_epoch(name),
    "NextEpoch-with-epoch": lambda client, name: client.next_epoch(name, epoch=0),
    "GetState": lambda client, name: client.get_state(name),
    "LoadState": lambda client, name: client.load_state(name, _zero_state()),
    "LoadState-bad-state": lambda client, name: client.load_state(name, _zero_state(C + 3)),
}


@pytest.mark.parametrize("rpc", list(NOT_FOUND_CALLS))
def test_unknown_session_is_not_found(client: lossd.Client, trained: str, rpc: str) -> None:
    missing = unique("missing")
    before = snapshot(client, trained)
    with pytest.raises(lossd.NotFoundError) as excinfo:
        NOT_FOUND_CALLS[rpc](client, missing)
    assert_error(excinfo.value, lossd.NotFoundError, repr(missing))
    with pytest.raises(lossd.NotFoundError):  # nothing was created on the way
        client.get_session(missing)
    assert_unchanged(client, trained, before)
    # The connection (and, for the stream, the stream) still serves the live session.
    client.compute_loss(trained, GOOD_LOGITS, GOOD_LABELS, training=False, stream=rpc == "LossStream")


def test_deleted_session_is_not_found(client: lossd.Client, trained: str) -> None:
    client.delete_session(trained)
    for call in NOT_FOUND_CALLS.values():
        with pytest.raises(lossd.NotFoundError):
            call(client, trained)


# ALREADY_EXISTS ------------------------------------------------------------------

OTHER_SPECS = {
    "smoothing": lossd.SessionSpec(kind="online_label_smoothing", n_classes=C, smoothing=0.2, alpha=0.5),
    "alpha": lossd.SessionSpec(kind="online_label_smoothing", n_classes=C, smoothing=0.1, alpha=0.25),
    "n_classes": lossd.SessionSpec(kind="online_label_smoothing", n_classes=C + 1, smoothing=0.1, alpha=0.5),
    "kind": lossd.SessionSpec(kind="label_smoothing", n_classes=C, smoothing=0.1),
    "reduction": lossd.SessionSpec(
        kind="online_label_smoothing", n_classes=C, smoothing=0.1, alpha=0.5, reduction="sum"
    ),
    "empty_class": lossd.SessionSpec(
        kind="online_label_smoothing", n_classes=C, smoothing=0.1, alpha=0.5, empty_class="zero"
    ),
    "weight": lossd.SessionSpec(
        kind="online_label_smoothing", n_classes=C, smoothing=0.1, alpha=0.5, weight=(1.0,) * C
    ),
}


@pytest.mark.parametrize("field", list(OTHER_SPECS))
def test_same_name_other_spec_is_already_exists(client: lossd.Client, trained: str, field: str) -> None:
    before = snapshot(client, trained)
    with pytest.raises(lossd.AlreadyExistsError) as excinfo:
        client.create_session(trained, OTHER_SPECS[field])
    assert_error(excinfo.value, lossd.AlreadyExistsError, repr(trained), field)
    assert_unchanged(client, trained, before)


@pytest.mark.parametrize(
    "spec",
    [
        OLS_SPEC,
        # The same spec with every default written out is the same canonical spec.
        lossd.SessionSpec(
            kind="online_label_smoothing",
            n_classes=C,
            smoothing=0.1,
            alpha=0.5,
            convention="off_target",
            init="label_smoothing",
            empty_class="keep",
            reduction="mean",
            ignore_index=-100,
        ),
    ],
    ids=["identical", "defaults-spelled-out"],
)
def test_same_name_same_spec_returns_the_existing_session(
    client: lossd.Client, trained: str, spec: lossd.SessionSpec
) -> None:
    before = snapshot(client, trained)
    info, created = client.create_session(trained, spec)
    assert created is False
    assert info == before.info
    assert info.epoch == 1 and info.samples_this_epoch == 3 * N
    assert_unchanged(client, trained, before)


# FAILED_PRECONDITION --------------------------------------------------------------


@pytest.mark.parametrize("epoch", [2, -1, 10**12])
def test_next_epoch_with_wrong_epoch_is_failed_precondition(client: lossd.Client, trained: str, epoch: int) -> None:
    before = snapshot(client, trained)
    with pytest.raises(lossd.FailedPreconditionError) as excinfo:
        client.next_epoch(trained, epoch=epoch)
    assert_error(excinfo.value, lossd.FailedPreconditionError, "epoch", str(epoch), "at epoch 1", repr(trained))
    assert_unchanged(client, trained, before)
    # Positive control: the right epoch advances exactly once; a repeat gets the same answer.
    finished = client.next_epoch(trained, epoch=1)
    assert finished.epoch == 2
    assert client.next_epoch(trained, epoch=1) == finished
    assert client.get_session(trained).epoch == 2
    # Only the epoch just finished is a repeat; an older one is stale.
    with pytest.raises(lossd.FailedPreconditionError):
        client.next_epoch(trained, epoch=0)
    assert client.get_session(trained).epoch == 2


# RESOURCE_EXHAUSTED -----------------------------------------------------------------


def test_max_sessions_is_resource_exhausted() -> None:
    with EmbeddedServer(embedded_settings(max_sessions=2)) as small, lossd.Client(small.target) as client:
        make_trained(client, "first")
        client.create_session("second", lossd.SessionSpec(kind="cross_entropy", n_classes=3))
        before = snapshot(client, "first")
        with pytest.raises(lossd.ResourceExhaustedError) as excinfo:
            client.create_session("third", lossd.SessionSpec(kind="cross_entropy", n_classes=3))
        assert_error(excinfo.value, lossd.ResourceExhaustedError, "max_sessions=2", "2 of")
        assert [s.name for s in client.list_sessions()] == ["first", "second"]
        assert_unchanged(client, "first", before)
        # Get-or-create of an existing session still works when the store is full.
        assert client.create_session("first", OLS_SPEC)[1] is False
        assert_unchanged(client, "first", before)
        client.compute_loss("first", GOOD_LOGITS, GOOD_LABELS, training=False)
        # Freeing a slot lets the third one in.
        client.delete_session("second")
        assert client.create_session("third", lossd.SessionSpec(kind="cross_entropy", n_classes=3))[1] is True


def ols_bytes(c: int) -> int:
    return c * c * (4 + 8) + c * 8


def assert_held(error: lossd.LossdError, held: int) -> None:
    """The bytes in use the message quotes: the resident session's, plus its two kept responses (< 1 KiB)."""
    match = re.search(r"; (\d+) of matrix_memory_bytes", error.message)
    assert match is not None, error.message
    assert held <= int(match.group(1)) < held + 1024, error.message


def test_matrix_memory_is_resource_exhausted() -> None:
    # The resident session's rank 0 also holds its replay log (1024 ids of at most 1 KiB) in the same budget.
    held = ols_bytes(C) + 1024 * ID_ENTRY_BYTES
    budget = held + 700
    assert ols_bytes(C) == 340 and ols_bytes(8) == 832 and ols_bytes(300) == 1_082_400 > budget
    with EmbeddedServer(embedded_settings(matrix_memory_bytes=budget)) as small, lossd.Client(small.target) as client:
        make_trained(client, "resident")
        before = snapshot(client, "resident")
        assert before.info.state_bytes == ols_bytes(C)

        # Alone too big for the budget.
        with pytest.raises(lossd.ResourceExhaustedError) as excinfo:
            client.create_session("big", lossd.SessionSpec(kind="online_label_smoothing", n_classes=300, alpha=0.5))
        assert_error(
            excinfo.value, lossd.ResourceExhaustedError, "1082400", "n_classes=300", f"matrix_memory_bytes={budget}"
        )
        assert_held(excinfo.value, held)

        # Fits alone (832 <= budget) but not next to the resident session (held + 832 > budget).
        with pytest.raises(lossd.ResourceExhaustedError) as excinfo:
            client.create_session("medium", lossd.SessionSpec(kind="online_label_smoothing", n_classes=8, alpha=0.5))
        assert_error(excinfo.value, lossd.ResourceExhaustedError, "832", "n_classes=8", f"matrix_memory_bytes={budget}")
        assert_held(excinfo.value, held)

        assert [s.name for s in client.list_sessions()] == ["resident"]
        assert_unchanged(client, "resident", before)

        # Stateless kinds hold no matrices, whatever C; a small OLS session still fits.
        assert client.create_session("ce", lossd.SessionSpec(kind="cross_entropy", n_classes=100_000))[1]
        assert client.create_session(
            "small-ols", lossd.SessionSpec(kind="online_label_smoothing", n_classes=4, alpha=0.5)
        )[1]
        assert_unchanged(client, "resident", before)


# LoadState ---------------------------------------------------------------------------


def _replace(state: lossd.SessionState, **changes: Any) -> lossd.SessionState:
    fields = dict(
        epoch=state.epoch,
        supervise=state.supervise.clone(),
        accumulator=state.accumulator.clone(),
        counts=state.counts.clone(),
        samples_this_epoch=state.samples_this_epoch,
    )
    fields.update(changes)
    return lossd.SessionState(**fields)


def _with_value(tensor: torch.Tensor, value: float) -> torch.Tensor:
    out = tensor.clone()
    out[1, 2] = value
    return out


BAD_STATES: dict[str, tuple[Callable[[lossd.SessionState], lossd.SessionState], tuple[str, ...]]] = {
    "supervise-wrong-C": (
        lambda s: _replace(s, supervise=torch.full((C + 1, C + 1), 0.1)),
        ("state.supervise", "shape"),
    ),
    "supervise-not-square": (
        lambda s: _replace(s, supervise=torch.full((C, C + 1), 0.1)),
        ("state.supervise", "shape"),
    ),
    "accumulator-wrong-C": (
        lambda s: _replace(s, accumulator=torch.zeros(C - 1, C - 1, dtype=torch.float64)),
        ("state.accumulator", "shape"),
    ),
    "counts-wrong-C": (lambda s: _replace(s, counts=torch.zeros(C + 1, dtype=torch.int64)), ("state.counts", "shape")),
    "all-wrong-C": (lambda s: _zero_state(C + 2), ("state.", "shape")),
    "supervise-nan": (lambda s: _replace(s, supervise=_with_value(s.supervise, math.nan)), ("state.supervise", "NaN")),
    "supervise-inf": (
        lambda s: _replace(s, supervise=_with_value(s.supervise, math.inf)),
        ("state.supervise", "infinity"),
    ),
    "accumulator-nan": (
        lambda s: _replace(s, accumulator=_with_value(s.accumulator, math.nan)),
        ("state.accumulator", "NaN"),
    ),
    "accumulator-neg-inf": (
        lambda s: _replace(s, accumulator=_with_value(s.accumulator, -math.inf)),
        ("state.accumulator",),
    ),
    "supervise-int": (
        lambda s: _replace(s, supervise=torch.ones(C, C, dtype=torch.int64)),
        ("state.supervise", "int64"),
    ),
    "counts-negative": (lambda s: _replace(s, counts=torch.tensor([1, 0, -1, 2, 0])), ("state.counts", "negative")),
    "counts-float": (lambda s: _replace(s, counts=s.counts.double()), ("state.counts", "float64")),
    "counts-float32": (lambda s: _replace(s, counts=s.counts.float()), ("state.counts", "float32")),
    "epoch-negative": (lambda s: _replace(s, epoch=-1), ("state.epoch", "-1")),
    "samples-negative": (lambda s: _replace(s, samples_this_epoch=-5), ("state.samples_this_epoch", "-5")),
}


@pytest.mark.parametrize("case", list(BAD_STATES))
def test_load_state_that_does_not_fit_is_invalid_argument(client: lossd.Client, trained: str, case: str) -> None:
    make, needles = BAD_STATES[case]
    before = snapshot(client, trained)
    with pytest.raises(lossd.InvalidArgumentError) as excinfo:
        client.load_state(trained, make(before.state))
    assert_error(excinfo.value, lossd.InvalidArgumentError, *needles)
    assert_unchanged(client, trained, before)


@pytest.mark.parametrize("field", ["supervise", "accumulator", "counts"])
def test_load_state_missing_or_malformed_tensor_is_invalid_argument(
    client: lossd.Client, stub: pb_grpc.LossServiceStub, trained: str, field: str
) -> None:
    before = snapshot(client, trained)
    state = before.state.to_proto()
    missing = pb.LoadStateRequest(session=trained, state=state)
    missing.state.ClearField(field)  # type: ignore[arg-type]
    with pytest.raises(lossd.InvalidArgumentError) as excinfo:
        call_raw(stub.LoadState, missing)
    assert_error(excinfo.value, lossd.InvalidArgumentError, f"state.{field}", "required")
    truncated = pb.LoadStateRequest(session=trained, state=state)
    tensor = getattr(truncated.state, field)
    tensor.data = tensor.data[:-1]
    with pytest.raises(lossd.InvalidArgumentError) as excinfo:
        call_raw(stub.LoadState, truncated)
    assert_error(excinfo.value, lossd.InvalidArgumentError, f"state.{field}", "bytes")
    assert_unchanged(client, trained, before)


def test_load_state_on_a_stateless_session_rejects_matrices(client: lossd.Client, session_name: str) -> None:
    client.create_session(session_name, lossd.SessionSpec(kind="label_smoothing", n_classes=C, smoothing=0.1))
    client.compute_loss(session_name, GOOD_LOGITS, GOOD_LABELS, training=True)
    before = snapshot(client, session_name)
    assert before.state.supervise.shape == (0, 0)
    with pytest.raises(lossd.InvalidArgumentError) as excinfo:
        client.load_state(session_name, _zero_state())
    assert_error(excinfo.value, lossd.InvalidArgumentError, "state.supervise", "shape", "[0, 0]")
    assert_unchanged(client, session_name, before)


def test_valid_load_state_does_change_the_state(client: lossd.Client, trained: str) -> None:
    """Positive control: the unchanged checks above would notice a load that went through."""
    before = snapshot(client, trained)
    supervise = torch.full((C, C), 1.0 / C)
    counts = torch.tensor([1, 0, 2, 0, 3])
    client.load_state(
        trained, _replace(before.state, epoch=7, supervise=supervise, counts=counts, samples_this_epoch=11)
    )
    after = client.get_state(trained)
    assert after.epoch == 7 and after.samples_this_epoch == 11
    assert torch.equal(after.supervise, supervise) and torch.equal(after.counts, counts)
    assert torch.equal(after.accumulator, before.state.accumulator)
    info = client.get_session(trained)
    assert info.epoch == 7 and info.correct_this_epoch == 6


# INTERNAL ------------------------------------------------------------------------------

SENTINEL = "sentinel-failure-7f3a"


@pytest.fixture()
def faulty(monkeypatch: pytest.MonkeyPatch) -> Iterator[EmbeddedServer]:
    """A server whose request decoding raises RuntimeError for the session named 'boom'."""
    real = servicer_module.decode_batch

    def decode_batch(request: pb.LossRequest, spec: lossd.SessionSpec, segment: Any = None) -> Any:
        if request.session == "boom":
            raise RuntimeError(SENTINEL)
        return real(request, spec, segment)

    monkeypatch.setattr(servicer_module, "decode_batch", decode_batch)
    with EmbeddedServer(embedded_settings()) as running:
        yield running


def _traceback_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [
        record
        for record in caplog.records
        if record.name == "lossd_server"
        and record.levelno >= logging.ERROR
        and record.exc_info is not None
        and isinstance(record.exc_info[1], RuntimeError)
        and str(record.exc_info[1]) == SENTINEL
    ]


@pytest.mark.parametrize(
    ("stream", "transport", "where"),
    [(False, "grpc", "ComputeLoss"), (True, "grpc", "LossStream"), (True, "local", "the local transport")],
    ids=["unary", "stream", "local"],
)
def test_unexpected_exception_is_internal_logged_and_the_server_keeps_serving(
    faulty: EmbeddedServer, caplog: pytest.LogCaptureFixture, stream: bool, transport: str, where: str
) -> None:
    caplog.set_level(logging.ERROR, logger="lossd_server")
    with lossd.Client(faulty.target, transport=transport) as client:
        client.create_session("boom", OLS_SPEC)
        client.create_session("fine", OLS_SPEC)
        before = snapshot(client, "boom")
        with pytest.raises(lossd.InternalError) as excinfo:
            client.compute_loss("boom", GOOD_LOGITS, GOOD_LABELS, training=True, stream=stream)
        error = excinfo.value
        assert type(error) is lossd.InternalError
        assert error.code is grpc.StatusCode.INTERNAL
        assert "RuntimeError" in error.message
        assert where in error.message

        records = _traceback_records(caplog)
        assert len(records) == 1, caplog.text
        assert "Traceback" in caplog.text and SENTINEL in caplog.text

        # The server, and for the stream the same stream, keeps serving.
        opened = client._open_stream()
        result = client.compute_loss("fine", GOOD_LOGITS, GOOD_LABELS, training=True, stream=stream)
        assert result.n_used == N
        if stream and transport == "grpc":
            assert client._open_stream() is opened and opened is not None and opened.usable
        assert client.get_state("fine").samples_this_epoch == N
        assert_unchanged(client, "boom", before)
        # The failure is repeatable and the server still answers other RPCs after it.
        with pytest.raises(lossd.InternalError):
            client.compute_loss("boom", GOOD_LOGITS, GOOD_LABELS, stream=stream)
        assert {s.name for s in client.list_sessions()} == {"boom", "fine"}
        assert len(_traceback_records(caplog)) == 2


def test_unexpected_exception_in_session_method_is_internal(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="lossd_server")

    def broken_arrive(self: Session, rank: int, epoch: int | None) -> None:
        raise RuntimeError(SENTINEL)

    with EmbeddedServer(embedded_settings()) as running, lossd.Client(running.target) as client:
        client.create_session("s", OLS_SPEC)
        monkeypatch.setattr(Session, "arrive", broken_arrive)
        with pytest.raises(lossd.InternalError) as excinfo:
            client.next_epoch("s")
        assert excinfo.value.code is grpc.StatusCode.INTERNAL
        assert "NextEpoch" in excinfo.value.message and "RuntimeError" in excinfo.value.message
        assert len(_traceback_records(caplog)) == 1, caplog.text
        monkeypatch.undo()
        assert client.next_epoch("s").epoch == 1
