"""Bounded, seeded fuzzing of every LossService RPC against a real server on loopback.

Requests go through the generated stubs over a raw ``grpc.insecure_channel`` (no lossd.Client, so
nothing is validated or retried on the way). Most are valid requests for one of a few fixed sessions
with up to three fields mutated (wrong dtypes, shapes and data lengths, NaN, infinities and 1e300,
counters near 2^53 and 2^63, long, empty and non-ASCII strings, unknown enum values, missing fields),
after up to two calls that move the session away from its
initial state (a LoadState of counters near their limits, a training batch, one rank's NextEpoch);
the rest are byte-level messages: random protobuf wire format, mutated serialisations, random bytes.

What every call must satisfy:

- it answers a code a client can act on (``ALLOWED``), and so does each LossStream response in-band
  (``error.code``): never INTERNAL or UNKNOWN, nor RESOURCE_EXHAUSTED for these small requests, nor
  UNAVAILABLE, nor DEADLINE_EXCEEDED except from NextEpoch, whose barrier may outwait its short deadline;
- rejected, it leaves its session byte-identical: GetState's bytes, GetSession's counters and spec;
- accepted, it leaves a state that is consistent (finite S and accumulator, counts >= 0 summing to
  correct_this_epoch <= samples_this_epoch) and that LoadState takes back (a checkpoint round trip);
- resent at once after it was applied (same request_id), it is accepted again, changes nothing, and a
  loss request gets the original answer;
- afterwards the health check answers SERVING, and a session no example touches answers GetSession.

Each example ends by recreating the session it used, so examples are independent and hypothesis can
shrink a failure; ``derandomize=True`` makes every run draw the same examples.
"""

from __future__ import annotations

import dataclasses
import math
import queue
import re
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, cast

import grpc
import numpy as np
import pytest
from google.protobuf.message import DecodeError, Message
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lossd.v1 import loss_service_pb2 as pb
from lossd.v1 import loss_service_pb2_grpc as pb_grpc
from lossd_server.config import Settings
from lossd_server.embedded import EmbeddedServer
from tests.conftest import TEST_DEVICE

SERVICE = "lossd.v1.LossService"
C = grpc.StatusCode

# Codes a fuzzed call may answer. Anything else is a finding (see the module docstring).
ALLOWED = frozenset(
    {C.OK, C.INVALID_ARGUMENT, C.NOT_FOUND, C.ALREADY_EXISTS, C.FAILED_PRECONDITION, C.OUT_OF_RANGE, C.ABORTED}
)
CODE_BY_VALUE = {code.value[0]: code for code in grpc.StatusCode}

CALL_TIMEOUT = 10.0  # a unary call that takes this long hangs: DEADLINE_EXCEEDED is then a finding
BARRIER_TIMEOUT = 0.3  # NextEpoch of one rank of two waits for the other; the server answers before it

# ------------------------------------------------------------------------------------------------
# Fixed sessions: one of each kind, one OLS with world_size=2. Examples target them by name.


@dataclass(frozen=True, eq=False)
class Fixed:
    """A session every example may use: created at module start, recreated after each example."""

    name: str
    spec: pb.SessionSpec

    @property
    def c(self) -> int:
        return int(self.spec.n_classes)

    @property
    def ols(self) -> bool:
        return self.spec.kind == pb.LOSS_KIND_ONLINE_LABEL_SMOOTHING

    @property
    def world_size(self) -> int:
        return max(1, int(self.spec.world_size))

    @property
    def ignore_index(self) -> int:
        return int(self.spec.ignore_index) if self.spec.HasField("ignore_index") else -100

    def __repr__(self) -> str:
        return self.name

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:  # how hypothesis prints it
        printer.text(repr(self))


_NP: dict[int, str] = {
    pb.DTYPE_FLOAT32: "<f4",
    pb.DTYPE_FLOAT16: "<f2",
    pb.DTYPE_FLOAT64: "<f8",
    pb.DTYPE_INT64: "<i8",
    pb.DTYPE_INT32: "<i4",
    pb.DTYPE_BFLOAT16: "<u2",
}
ITEMSIZE: dict[int, int] = {pb.DTYPE_FLOAT32: 4, pb.DTYPE_FLOAT16: 2, pb.DTYPE_BFLOAT16: 2, pb.DTYPE_FLOAT64: 8}
ITEMSIZE |= {pb.DTYPE_INT64: 8, pb.DTYPE_INT32: 4}
FLOAT_DTYPES = (pb.DTYPE_FLOAT32, pb.DTYPE_FLOAT16, pb.DTYPE_BFLOAT16, pb.DTYPE_FLOAT64)
INT_DTYPES = (pb.DTYPE_INT64, pb.DTYPE_INT32)


def _wrap(value: Any, bits: int) -> int:
    """An int (or a float, truncated) wrapped into a signed ``bits``-bit integer; NaN and inf become 0."""
    if isinstance(value, float):
        value = int(value) if math.isfinite(value) else 0
    half = 1 << (bits - 1)
    return (int(value) + half) % (1 << bits) - half


def encode(dtype: int, shape: list[int], values: list[Any]) -> bytes:
    """``values`` as ``dtype``'s little-endian bytes (floats overflow to inf, ints wrap around)."""
    with np.errstate(all="ignore"):
        if dtype in INT_DTYPES:
            bits = ITEMSIZE[dtype] * 8
            return np.array([_wrap(v, bits) for v in values], dtype=_NP[dtype]).tobytes()
        floats = np.array([float(v) for v in values], dtype=np.float64)
        if dtype == pb.DTYPE_BFLOAT16:
            return (floats.astype("<f4").view("<u4") >> 16).astype("<u2").tobytes()
        return floats.astype(_NP.get(dtype, "<f4")).tobytes()


def raw_tensor(dtype: int, shape: list[int], data: bytes) -> pb.Tensor:
    """A Tensor message as given: ``dtype`` may be a value DType does not name (proto3 enums are open)."""
    return pb.Tensor(dtype=cast(Any, dtype), shape=shape, data=data)


def tensor(dtype: int, shape: list[int], values: list[Any]) -> pb.Tensor:
    return raw_tensor(dtype, shape, encode(dtype, shape, values))


def decode(message: pb.Tensor) -> np.ndarray:
    """A tensor the server sent (so well-formed), as float64 or int64."""
    raw = np.frombuffer(message.data, dtype=_NP[message.dtype])
    if message.dtype == pb.DTYPE_BFLOAT16:
        raw = (raw.astype("<u4") << 16).view("<f4")
    return raw.astype(np.int64 if message.dtype in INT_DTYPES else np.float64).reshape(tuple(message.shape))


FIXED = (
    Fixed("fuzz-ce", pb.SessionSpec(kind=pb.LOSS_KIND_CROSS_ENTROPY, n_classes=3, reduction=pb.REDUCTION_SUM)),
    Fixed(
        "fuzz-ls",
        pb.SessionSpec(
            kind=pb.LOSS_KIND_LABEL_SMOOTHING,
            n_classes=5,
            smoothing=0.2,
            reduction=pb.REDUCTION_NONE,
            ignore_index=-1,
            weight=tensor(pb.DTYPE_FLOAT32, [5], [1.0, 0.5, 2.0, 1.0, 0.25]),
        ),
    ),
    Fixed("fuzz-ols", pb.SessionSpec(kind=pb.LOSS_KIND_ONLINE_LABEL_SMOOTHING, n_classes=4, smoothing=0.1, alpha=0.5)),
    Fixed(
        "fuzz-ols2",
        pb.SessionSpec(
            kind=pb.LOSS_KIND_ONLINE_LABEL_SMOOTHING,
            n_classes=6,
            smoothing=0.2,
            alpha=0.3,
            convention=pb.SMOOTHING_CONVENTION_UNIFORM,
            init=pb.OLS_INIT_UNIFORM,
            empty_class=pb.EMPTY_CLASS_POLICY_ZERO,
            world_size=2,
        ),
    ),
)
FIXED_NAMES = frozenset(f.name for f in FIXED)
ROUND_TRIP = "fuzz-round-trip"  # a scratch session that each accepted state is loaded into
STATE_CHANGES = frozenset({"ComputeLoss", "LossStream", "NextEpoch", "LoadState", "AddStatistics"})
# Never the target of a fuzzed call: GetSession of it after every call shows the server still serves.
ANCHOR = Fixed("fuzz-anchor", pb.SessionSpec(kind=pb.LOSS_KIND_CROSS_ENTROPY, n_classes=2))

# ------------------------------------------------------------------------------------------------
# Readable examples: hypothesis prints the falsifying calls with these reprs.


def _compact(text: str) -> str:
    text = re.sub(r"(.)\1{11,}", lambda m: f"{m.group(1)!r}*{len(m.group(0))}", text, flags=re.S)
    return text if len(text) <= 1500 else f"{text[:1500]}...<{len(text)} characters>"


def describe(message: Any) -> str:
    if isinstance(message, bytes):
        return f"bytes({len(message)}: {message[:64].hex()}{'...' if len(message) > 64 else ''})"
    if isinstance(message, pb.Tensor):
        parts = [f"dtype={pb.DType.Name(message.dtype) if message.dtype in ITEMSIZE else message.dtype}"]
        parts.append(f"shape={list(message.shape)}")
        size = ITEMSIZE.get(message.dtype)
        count = math.prod(message.shape) if all(0 <= d < 1 << 20 for d in message.shape) else -1
        if size is not None and count >= 0 and len(message.data) == count * size and count <= 64:
            values = decode(message).reshape(-1).tolist()
            if len(set(map(repr, values))) == 1 and len(values) > 1:
                parts.append(f"values=[{values[0]!r}]*{len(values)}")
            else:
                parts.append(f"values=[{', '.join(f'{v:.9g}' if isinstance(v, float) else str(v) for v in values)}]")
        elif message.data:
            parts.append(f"data=<{len(message.data)} bytes>")
        return f"Tensor({', '.join(parts)})"
    parts = []
    for fd, value in message.ListFields():
        if fd.message_type is not None:
            shown = "[" + ", ".join(map(describe, value)) + "]" if fd.is_repeated else describe(value)
        elif fd.enum_type is not None and not fd.is_repeated:
            known = fd.enum_type.values_by_number.get(value)
            shown = known.name if known is not None else str(value)
        elif fd.is_repeated:
            shown = repr(list(value))
        else:
            shown = repr(value)
        parts.append(f"{fd.name}={shown}")
    return f"{type(message).__name__}({', '.join(parts)})"


@dataclass
class Call:
    """One fuzzed call: ``request`` is a message, or for LossStream a list; bytes when ``raw``."""

    rpc: str
    request: Any
    target: str | None  # the session the request names: whose state a rejection must leave alone
    raw: bool = False
    may_exhaust: bool = False  # a CreateSession of a huge n_classes may be RESOURCE_EXHAUSTED
    resend: bool = False  # the same request as the call before it (a client retrying)
    resends: frozenset[int] = frozenset()  # LossStream: the requests that repeat the one before them

    def __repr__(self) -> str:
        if isinstance(self.request, list):
            shown = [("RESEND " if i in self.resends else "") + describe(r) for i, r in enumerate(self.request)]
            body = "[" + ", ".join(shown) + "]"
        else:
            body = describe(self.request)
        return _compact(f"{'RESEND ' if self.resend else ''}{self.rpc}{'[raw]' if self.raw else ''}({body})")

    def deduplicated(self, request: Any) -> bool:
        """Whether the server applies ``request`` at most once, answering a resend as the original."""
        if self.raw:
            return False
        if isinstance(request, pb.LossRequest):
            return request.training and bool(request.request_id)
        if isinstance(request, pb.NextEpochRequest):  # a repeat for the epoch just finished
            return request.HasField("epoch")
        return isinstance(request, pb.StatisticsRequest)

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:  # how hypothesis prints it
        printer.text(repr(self))


# ------------------------------------------------------------------------------------------------
# Value strategies.

HUGE_INTS = (
    -1,
    -2,
    -100,
    -(1 << 31),
    (1 << 31) - 1,
    1 << 31,
    1 << 32,
    (1 << 53) - 1,
    1 << 53,
    (1 << 53) + 1,
    1 << 62,
    (1 << 63) - 2,
    (1 << 63) - 1,
    -(1 << 63),
    -(1 << 63) + 1,
)
odd_ints = st.one_of(st.sampled_from(HUGE_INTS), st.integers(-3, 12), st.integers(-(1 << 63), (1 << 63) - 1))
FLOAT_SPECIALS = (
    math.nan,
    math.inf,
    -math.inf,
    1e300,
    -1e300,
    3.4028234663852886e38,
    -3.4028234663852886e38,
    3.5e38,
    1e38,
    -1e38,
    65504.0,
    65520.0,
    -65520.0,
    1e-45,
    5e-324,
    -0.0,
    1e30,
)
# Just below the limits of counters: 2^53 (exact in float64) and 2^63 (int64).
near_limits = st.tuples(st.sampled_from([1 << 53, 1 << 62, (1 << 63) - 1]), st.integers(0, 8)).map(
    lambda pair: pair[0] - pair[1]
)
odd_counters = st.one_of(odd_ints, near_limits)
odd_floats = st.one_of(
    st.sampled_from((*FLOAT_SPECIALS, -1.0, 1.0, 0.9999999999999999, 1.0000000000000002, 2.0)), st.floats()
)
BAD_ENUMS = (-1, 4, 7, 99, (1 << 31) - 1, -(1 << 31))
odd_enums = st.one_of(st.sampled_from(BAD_ENUMS), st.integers(0, 6))

LONG_STRINGS = ("n" * 10_000, "é" * 10_000, "\U0001f642" * 10_000, "a" * 256, "a" * 257, "x" * 128, "x" * 129)
ODD_STRINGS = ("", " ", "\x00", "a b", "ünïcødé", "\U0001f642", "-lead", ".", "fuzz-ce\x00", "fuzz-ce ", "../x")
odd_strings = st.one_of(
    st.sampled_from(ODD_STRINGS), st.sampled_from(LONG_STRINGS), st.text(max_size=24), st.text(min_size=300)
)
odd_names = st.one_of(odd_strings, st.just("fuzz-missing"), st.sampled_from([n.upper() for n in FIXED_NAMES]))
valid_ids = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-_.:", min_size=1, max_size=16)
# The server allows an empty request_id (no deduplication) on loss requests.
loss_ids = st.one_of(st.just(""), valid_ids)
logit_values = st.floats(-8.0, 8.0, width=32)


def fixed_sessions() -> st.SearchStrategy[Fixed]:
    return st.sampled_from(FIXED)


@st.composite
def session_name(draw: st.DrawFn, fixed: Fixed, mutate: bool) -> str:
    """The fixed session's name, or mostly-odd strings when mutated."""
    return draw(odd_names) if mutate else fixed.name


@st.composite
def mutated_tensor(
    draw: st.DrawFn, dtype: int, shape: list[int], values: list[Any], integral: bool
) -> pb.Tensor | None:
    """A valid (dtype, shape, values) tensor with one thing wrong; None means the field is not set."""
    how = draw(
        st.sampled_from(
            [
                "values",
                "float64-values",
                "values",
                "recast",
                "dtype",
                "shape",
                "consistent-shape",
                "length",
                "missing",
                "empty",
                "float64-values",
                "random",
            ]
        )
    )
    if how == "missing":
        return None
    if how == "empty":
        return pb.Tensor()
    if how in ("values", "float64-values"):
        if how == "float64-values":
            dtype = pb.DTYPE_FLOAT64
        specials = st.sampled_from(HUGE_INTS) if integral and how == "values" else st.sampled_from(FLOAT_SPECIALS)
        values = list(values)
        if values:
            for _ in range(draw(st.integers(1, 3))):
                values[draw(st.integers(0, len(values) - 1))] = draw(specials)
        return tensor(dtype, shape, values)
    if how == "recast":
        return tensor(draw(st.sampled_from(sorted(ITEMSIZE))), shape, values)
    if how == "dtype":
        return raw_tensor(draw(odd_enums), shape, encode(dtype, shape, values))
    if how == "shape":
        new_shape = draw(st.lists(st.one_of(st.integers(-2, 9), st.sampled_from(HUGE_INTS)), max_size=4))
        return raw_tensor(dtype, new_shape, encode(dtype, shape, values))
    if how == "consistent-shape":
        new_shape = draw(st.lists(st.integers(0, 9), max_size=3).filter(lambda s: math.prod(s) <= 64))
        element = st.integers(-3, 12) if integral else logit_values
        size = math.prod(new_shape)
        return tensor(dtype, new_shape, draw(st.lists(element, min_size=size, max_size=size)))
    if how == "length":
        data = encode(dtype, shape, values)
        delta = draw(st.integers(1, 9))
        data = data[:-delta] if data and draw(st.booleans()) else data + bytes(delta)
        return raw_tensor(dtype, shape, data)
    return raw_tensor(draw(odd_enums), draw(st.lists(st.integers(-1, 9), max_size=3)), draw(st.binary(max_size=64)))


@st.composite
def maybe_mutated_tensor(
    draw: st.DrawFn, mutate: bool, dtype: int, shape: list[int], values: list[Any], integral: bool = False
) -> pb.Tensor | None:
    if mutate:
        return draw(mutated_tensor(dtype, shape, values, integral))
    return tensor(dtype, shape, values)


def _int64(value: int) -> int:
    """``value`` clipped into int64 (a sum of counts near 2^63 may pass it; protobuf refuses that)."""
    return max(-(1 << 63), min((1 << 63) - 1, value))


def _pick(draw: st.DrawFn, fields: list[str]) -> set[str]:
    """The fields to mutate: none (a valid request) to three. Shrinks towards a valid request."""
    return draw(st.sets(st.sampled_from(fields), max_size=3))


def _set_tensor(message: Message, name: str, value: pb.Tensor | None) -> None:
    if value is None:
        message.ClearField(name)
    else:
        getattr(message, name).CopyFrom(value)


# ------------------------------------------------------------------------------------------------
# Request strategies, one per RPC. Each takes the fixed session the example works on.


@st.composite
def create_session_call(draw: st.DrawFn, fixed: Fixed) -> Call:
    fields = ["name", "kind", "n_classes", "smoothing", "convention", "alpha", "reduction", "ignore_index"]
    fields += ["weight", "init", "empty_class", "world_size", "spec"]
    mutate = _pick(draw, fields)
    # A valid name: the fixed one (get-or-create answers it) or a new one (created, removed after the example).
    name = draw(odd_names) if "name" in mutate else draw(st.sampled_from([fixed.name, "fuzz-new-0", "fuzz-new-1"]))
    spec = pb.SessionSpec()
    spec.CopyFrom(fixed.spec)
    if "kind" in mutate:
        spec.kind = cast(Any, draw(odd_enums))
    for enum_field in ("convention", "reduction", "init", "empty_class"):
        if enum_field in mutate:
            setattr(spec, enum_field, draw(odd_enums))
    if "n_classes" in mutate:
        spec.n_classes = draw(odd_ints)
    if "smoothing" in mutate:
        spec.smoothing = draw(odd_floats)
    if "alpha" in mutate:
        if draw(st.booleans()):
            spec.ClearField("alpha")
        else:
            spec.alpha = draw(odd_floats)
    if "ignore_index" in mutate:
        if draw(st.booleans()):
            spec.ClearField("ignore_index")
        else:
            spec.ignore_index = draw(odd_ints)
    if "weight" in mutate:
        weights = [1.0 + 0.5 * k for k in range(fixed.c)]
        _set_tensor(spec, "weight", draw(mutated_tensor(pb.DTYPE_FLOAT32, [fixed.c], weights, False)))
    if "world_size" in mutate:
        spec.world_size = draw(st.one_of(st.sampled_from([0, 1, 2, 3, 1 << 16, (1 << 16) + 1]), odd_ints))
    request = pb.CreateSessionRequest(name=name, spec=spec)
    if "spec" in mutate:
        request.ClearField("spec")
    # An OLS session holds 12 C^2 bytes: past a few thousand classes refusing it for memory is right.
    return Call("CreateSession", request, name, may_exhaust=abs(spec.n_classes) > 4096)


@st.composite
def get_session_call(draw: st.DrawFn, fixed: Fixed) -> Call:
    name = draw(session_name(fixed, draw(st.booleans())))
    return Call("GetSession", pb.GetSessionRequest(name=name), name)


@st.composite
def delete_session_call(draw: st.DrawFn, fixed: Fixed) -> Call:
    name = draw(session_name(fixed, draw(st.integers(0, 3)) == 0))
    return Call("DeleteSession", pb.DeleteSessionRequest(name=name), name)


def list_sessions_call(fixed: Fixed) -> st.SearchStrategy[Call]:
    return st.just(Call("ListSessions", pb.ListSessionsRequest(), None))


@st.composite
def valid_batch(draw: st.DrawFn, fixed: Fixed) -> tuple[int, list[float], int, list[int]]:
    """(logits dtype, [N * C] logits, labels dtype, [N] labels), N <= 8, some labels ignored."""
    n = draw(st.integers(0, 8))
    logits = draw(st.lists(logit_values, min_size=n * fixed.c, max_size=n * fixed.c))
    label = st.one_of(st.integers(0, fixed.c - 1), st.just(fixed.ignore_index))
    labels = draw(st.lists(label, min_size=n, max_size=n))
    return draw(st.sampled_from(FLOAT_DTYPES)), logits, draw(st.sampled_from(INT_DTYPES)), labels


@st.composite
def loss_request(draw: st.DrawFn, fixed: Fixed) -> pb.LossRequest:
    fields = ["session", "logits", "labels", "request_id", "rank", "epoch"]
    mutate = _pick(draw, fields)
    logits_dtype, logits, labels_dtype, labels = draw(valid_batch(fixed))
    n = len(labels)
    request = pb.LossRequest(
        session=draw(session_name(fixed, "session" in mutate)),
        training=draw(st.booleans()),
        need_grad=draw(st.booleans()),
        request_id=draw(odd_strings if "request_id" in mutate else loss_ids),
        rank=draw(odd_ints if "rank" in mutate else st.integers(0, fixed.world_size - 1)),
    )
    _set_tensor(request, "logits", draw(maybe_mutated_tensor("logits" in mutate, logits_dtype, [n, fixed.c], logits)))
    _set_tensor(request, "labels", draw(maybe_mutated_tensor("labels" in mutate, labels_dtype, [n], labels, True)))
    if "epoch" in mutate:
        request.epoch = draw(odd_ints)
    elif draw(st.booleans()):
        request.epoch = 0  # each example starts at epoch 0
    return request


@st.composite
def compute_loss_call(draw: st.DrawFn, fixed: Fixed) -> Call:
    request = draw(loss_request(fixed))
    return Call("ComputeLoss", request, request.session)


@st.composite
def next_epoch_call(draw: st.DrawFn, fixed: Fixed) -> Call:
    mutate = _pick(draw, ["session", "epoch", "rank"])
    request = pb.NextEpochRequest(
        session=draw(session_name(fixed, "session" in mutate)),
        rank=draw(odd_ints if "rank" in mutate else st.integers(0, fixed.world_size - 1)),
    )
    if "epoch" in mutate:
        if draw(st.booleans()):
            request.epoch = draw(odd_ints)
    elif fixed.world_size > 1 or draw(st.booleans()):
        request.epoch = 0
    return Call("NextEpoch", request, request.session)


@st.composite
def state_read_call(draw: st.DrawFn, fixed: Fixed) -> Call:
    rpc = draw(st.sampled_from(["GetState", "GetSoftLabels", "GetSoftLabelHistory"]))
    mutate = _pick(draw, ["session", "epoch"])
    request = pb.GetStateRequest(session=draw(session_name(fixed, "session" in mutate)))
    if "epoch" in mutate:
        request.epoch = draw(odd_ints)
    elif rpc == "GetSoftLabels" and draw(st.booleans()):
        request.epoch = 0
    return Call(rpc, request, request.session)


@st.composite
def coherent_huge_counts(draw: st.DrawFn, c: int) -> list[int]:
    """Counts near 2^53 or 2^63, alone or so that their sum passes int64."""
    big = st.sampled_from([(1 << 53) - 1, 1 << 53, (1 << 53) + 1, 1 << 62, (1 << 63) - 1])
    counts = [0] * c
    for _ in range(draw(st.integers(1, min(3, c)))):
        counts[draw(st.integers(0, c - 1))] = draw(big)
    return counts


@st.composite
def load_state_call(draw: st.DrawFn, fixed: Fixed) -> Call:
    fields = ["session", "epoch", "samples", "supervise", "accumulator", "counts", "state", "huge-counts"]
    fields += ["samples", "counts", "huge-counts", "supervise", "accumulator", "few-samples"]  # weighted: more often
    mutate = _pick(draw, fields)
    c = fixed.c if fixed.ols else 0
    weights = draw(st.lists(st.integers(1, 4), min_size=c * c, max_size=c * c))
    # Column k of S is a distribution: normalise each column of the [C, C] weights.
    supervise = [weights[i * c + k] / sum(weights[j * c + k] for j in range(c)) for i in range(c) for k in range(c)]
    accumulator = draw(st.lists(st.floats(0.0, 10.0), min_size=c * c, max_size=c * c))
    counts = draw(st.lists(st.integers(0, 5), min_size=c, max_size=c))
    if "huge-counts" in mutate and c:
        counts = draw(coherent_huge_counts(c))
    samples = sum(counts) + draw(st.integers(0, 5))
    if "samples" in mutate:
        samples = draw(odd_counters)
    if "few-samples" in mutate and c:  # fewer samples than correctly predicted ones
        counts[draw(st.integers(0, c - 1))] += draw(st.integers(1, 3))
        samples = draw(st.integers(0, sum(counts) - 1))
    state = pb.SessionState(
        epoch=draw(odd_ints if "epoch" in mutate else st.integers(0, 3)),
        samples_this_epoch=_int64(samples),
    )
    _set_tensor(
        state, "supervise", draw(maybe_mutated_tensor("supervise" in mutate, pb.DTYPE_FLOAT32, [c, c], supervise))
    )
    _set_tensor(
        state, "accumulator", draw(maybe_mutated_tensor("accumulator" in mutate, pb.DTYPE_FLOAT64, [c, c], accumulator))
    )
    _set_tensor(state, "counts", draw(maybe_mutated_tensor("counts" in mutate, pb.DTYPE_INT64, [c], counts, True)))
    request = pb.LoadStateRequest(session=draw(session_name(fixed, "session" in mutate)), state=state)
    if "state" in mutate:
        request.ClearField("state")
    return Call("LoadState", request, request.session)


@st.composite
def add_statistics_call(draw: st.DrawFn, fixed: Fixed) -> Call:
    fields = ["session", "rank", "epoch", "request_id", "classes", "rows", "counts", "samples", "correct"]
    fields += ["huge-counts", "huge-counts", "samples", "correct", "counts", "rows"]  # weighted: more often
    mutate = _pick(draw, fields)
    c = fixed.c
    k = draw(st.integers(0, c))
    classes = draw(st.lists(st.integers(0, c - 1), min_size=k, max_size=k))
    counts = draw(st.lists(st.integers(0, 5), min_size=k, max_size=k))
    if "huge-counts" in mutate and k:
        counts = draw(coherent_huge_counts(k))
    # Row j sums counts[j] probability vectors: counts[j] times a distribution.
    shares = draw(st.lists(st.integers(1, 4), min_size=k * c, max_size=k * c))
    rows = [counts[j] * shares[j * c + i] / sum(shares[j * c : (j + 1) * c]) for j in range(k) for i in range(c)]
    correct = sum(counts)
    samples = correct + draw(st.integers(0, 5))
    request = pb.StatisticsRequest(
        session=draw(session_name(fixed, "session" in mutate)),
        rank=draw(odd_ints if "rank" in mutate else st.integers(0, fixed.world_size - 1)),
        request_id=draw(odd_strings if "request_id" in mutate else valid_ids),
        samples=_int64(draw(odd_counters) if "samples" in mutate else samples),
        correct=_int64(draw(odd_counters) if "correct" in mutate else correct),
    )
    if "epoch" in mutate:
        if draw(st.booleans()):
            request.epoch = draw(odd_ints)
    else:
        request.epoch = 0
    _set_tensor(request, "classes", draw(maybe_mutated_tensor("classes" in mutate, pb.DTYPE_INT64, [k], classes, True)))
    _set_tensor(request, "rows", draw(maybe_mutated_tensor("rows" in mutate, pb.DTYPE_FLOAT64, [k, c], rows)))
    _set_tensor(request, "counts", draw(maybe_mutated_tensor("counts" in mutate, pb.DTYPE_INT64, [k], counts, True)))
    return Call("AddStatistics", request, request.session)


STATE_READS = ("GetState", "GetSoftLabels", "GetSoftLabelHistory")  # one strategy draws all three
UNARY_STRATEGIES: dict[str, Callable[[Fixed], st.SearchStrategy[Call]]] = {
    "CreateSession": create_session_call,
    "GetSession": get_session_call,
    "ListSessions": list_sessions_call,
    "DeleteSession": delete_session_call,
    "ComputeLoss": compute_loss_call,
    "NextEpoch": next_epoch_call,
    "GetState": state_read_call,
    "GetSoftLabels": state_read_call,
    "GetSoftLabelHistory": state_read_call,
    "LoadState": load_state_call,
    "AddStatistics": add_statistics_call,
}


@st.composite
def near_limit_state(draw: st.DrawFn, fixed: Fixed) -> Call:
    """A valid LoadState whose epoch, samples or one count sits just below 2^53 or 2^63 (which the server
    may refuse): so that the next training batch, upload or NextEpoch crosses the limit."""
    c = fixed.c if fixed.ols else 0
    counts = [0] * c
    samples = draw(st.integers(0, 5))
    if c and draw(st.booleans()):
        counts[draw(st.integers(0, c - 1))] = draw(near_limits)
        samples = min((1 << 63) - 1, sum(counts) + draw(st.integers(0, 3)))
    else:
        samples = draw(st.one_of(near_limits, st.just(samples)))
    epoch = draw(st.integers(0, 2)) if draw(st.integers(0, 3)) else draw(near_limits)
    # Every column's soft label uniform, the accumulator empty: nothing else to get wrong.
    state = pb.SessionState(
        epoch=epoch,
        samples_this_epoch=samples,
        supervise=tensor(pb.DTYPE_FLOAT32, [c, c], [1.0 / c] * (c * c) if c else []),
        accumulator=tensor(pb.DTYPE_FLOAT64, [c, c], [0.0] * (c * c)),
        counts=tensor(pb.DTYPE_INT64, [c], counts),
    )
    return Call("LoadState", pb.LoadStateRequest(session=fixed.name, state=state), fixed.name)


def _state_setters(fixed: Fixed) -> list[st.SearchStrategy[Call]]:
    """The calls that move a session away from its initial state, mostly valid: what runs before the
    call under test, so that it also meets counters near their limits, a rank already waiting in
    NextEpoch, a later epoch, a deleted session."""
    return [
        near_limit_state(fixed),
        near_limit_state(fixed),
        load_state_call(fixed),
        compute_loss_call(fixed),
        add_statistics_call(fixed),
        next_epoch_call(fixed),
        delete_session_call(fixed),
    ]


@st.composite
def unary_examples(draw: st.DrawFn, rpc: str) -> tuple[Fixed, list[Call]]:
    """Up to two state-changing calls on a fixed session, then one to two calls of ``rpc`` on it."""
    fixed = draw(fixed_sessions())
    setup = draw(st.lists(st.one_of(_state_setters(fixed)), max_size=2))
    main = UNARY_STRATEGIES[rpc](fixed)
    if rpc in STATE_READS:
        main = main.filter(lambda call: call.rpc == rpc)
    calls = setup + draw(st.lists(main, min_size=1, max_size=2))
    if draw(st.booleans()):  # a client retrying one of the calls at once
        at = draw(st.integers(0, len(calls) - 1))
        calls.insert(at + 1, dataclasses.replace(calls[at], resend=True))
    return fixed, calls


@st.composite
def stream_examples(draw: st.DrawFn) -> tuple[Fixed, list[Call]]:
    fixed = draw(fixed_sessions())
    setup = draw(st.lists(st.one_of(_state_setters(fixed)), max_size=2))
    requests = draw(st.lists(loss_request(fixed), min_size=1, max_size=4))
    resends: frozenset[int] = frozenset()
    if draw(st.booleans()):  # a client resending one of the requests at once
        at = draw(st.integers(0, len(requests) - 1))
        requests.insert(at + 1, requests[at])
        resends = frozenset({at + 1})
    return fixed, [*setup, Call("LossStream", requests, fixed.name, resends=resends)]


# Request message class of each method, for the byte-level fuzzing.
REQUEST_TYPES: dict[str, type[Message]] = {
    "CreateSession": pb.CreateSessionRequest,
    "GetSession": pb.GetSessionRequest,
    "ListSessions": pb.ListSessionsRequest,
    "DeleteSession": pb.DeleteSessionRequest,
    "ComputeLoss": pb.LossRequest,
    "LossStream": pb.LossRequest,
    "NextEpoch": pb.NextEpochRequest,
    "GetState": pb.GetStateRequest,
    "LoadState": pb.LoadStateRequest,
    "GetSoftLabels": pb.GetStateRequest,
    "GetSoftLabelHistory": pb.GetStateRequest,
    "AddStatistics": pb.StatisticsRequest,
}


@st.composite
def wire_message(draw: st.DrawFn, depth: int = 0) -> bytes:
    """Random protobuf wire format: fields 1-20 (and a few far ones) of every wire type."""

    def varint(value: int) -> bytes:
        value &= (1 << 64) - 1
        out = bytearray()
        while True:
            byte, value = value & 0x7F, value >> 7
            out.append(byte | (0x80 if value else 0))
            if not value:
                return bytes(out)

    out = bytearray()
    for _ in range(draw(st.integers(0, 5))):
        number = draw(st.one_of(st.integers(1, 20), st.sampled_from([16, 17, 536870911])))
        wire = draw(st.sampled_from([0, 1, 2, 5]))
        out += varint(number << 3 | wire)
        if wire == 0:
            out += varint(draw(st.one_of(st.sampled_from(HUGE_INTS), st.integers(-5, 300))))
        elif wire == 1:
            out += struct.pack("<d", draw(odd_floats))
        elif wire == 5:
            out += struct.pack("<f", draw(st.floats(width=32)))
        else:
            if depth < 2 and draw(st.booleans()):
                payload = draw(wire_message(depth + 1))
            else:
                payload = draw(st.one_of(st.binary(max_size=24), st.text(max_size=12).map(str.encode)))
            out += varint(len(payload)) + payload
    return bytes(out)


@st.composite
def raw_request(draw: st.DrawFn, rpc: str, fixed: Fixed) -> bytes:
    how = draw(st.sampled_from(["wire", "mutated", "concatenated", "random"]))
    if how == "wire":
        return draw(wire_message())
    if how == "random":
        return draw(st.binary(max_size=64))
    if rpc in ("ComputeLoss", "LossStream"):
        valid = draw(loss_request(fixed)).SerializeToString()
    elif rpc in ("GetState", "GetSoftLabels", "GetSoftLabelHistory"):
        valid = draw(state_read_call(fixed)).request.SerializeToString()
    else:
        valid = draw(UNARY_STRATEGIES[rpc](fixed)).request.SerializeToString()
    if how == "concatenated":  # parses as the merge of the two
        return valid + draw(raw_request(rpc, fixed))
    data = bytearray(valid)
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.sampled_from(["flip", "truncate", "insert", "delete"]))
        at = draw(st.integers(0, len(data)))
        if op == "flip" and at < len(data):
            data[at] ^= draw(st.integers(1, 255))
        elif op == "truncate":
            del data[at:]
        elif op == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=4))
        elif at < len(data):
            del data[at]
    return bytes(data)


def _named_session(rpc: str, data: bytes) -> str | None:
    try:
        message = REQUEST_TYPES[rpc].FromString(data)
    except DecodeError:
        return None
    name = getattr(message, "name", None) if rpc in ("CreateSession", "GetSession", "DeleteSession") else None
    return name if name is not None else getattr(message, "session", None)


@st.composite
def raw_examples(draw: st.DrawFn) -> tuple[Fixed, list[Call]]:
    fixed = draw(fixed_sessions())
    calls = []
    for _ in range(draw(st.integers(1, 2))):
        rpc = draw(st.sampled_from(sorted(REQUEST_TYPES)))
        if rpc == "LossStream":
            requests = draw(st.lists(raw_request(rpc, fixed), min_size=1, max_size=3))
            calls.append(Call(rpc, requests, fixed.name, raw=True))
        else:
            data = draw(raw_request(rpc, fixed))
            calls.append(Call(rpc, data, _named_session(rpc, data), raw=True))
    return fixed, calls


# ------------------------------------------------------------------------------------------------
# The harness: a server of this module's own, its channel, and the checks.


def _code_name(code: grpc.StatusCode | int) -> str:
    return code.name if isinstance(code, grpc.StatusCode) else str(code)


@dataclass
class Outcome:
    code: grpc.StatusCode
    details: str = ""
    response: Any = None


@dataclass
class Harness:
    server: EmbeddedServer
    channel: grpc.Channel
    stub: pb_grpc.LossServiceStub
    health: health_pb2_grpc.HealthStub
    pristine: dict[str, tuple[Any, ...] | None] = field(default_factory=dict)
    clean: bool = True  # every fixed session as created

    def __repr__(self) -> str:
        return f"Harness({self.server.target})"

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        printer.text(repr(self))

    # Calls ----------------------------------------------------------------------------------

    def unary(self, rpc: str, request: Any, raw: bool = False, timeout: float = CALL_TIMEOUT) -> Outcome:
        method = self.channel.unary_unary(f"/{SERVICE}/{rpc}") if raw else getattr(self.stub, rpc)
        try:
            return Outcome(C.OK, response=method(request, timeout=timeout))
        except grpc.RpcError as error:
            return Outcome(error.code(), error.details() or "")

    def must(self, rpc: str, request: Any) -> Any:
        outcome = self.unary(rpc, request)
        assert outcome.code == C.OK, f"{rpc}({describe(request)}) of the harness: {outcome.code} {outcome.details}"
        return outcome.response

    # State ----------------------------------------------------------------------------------

    def snapshot(self, name: str | None) -> tuple[Any, ...] | None:
        """GetState's bytes and GetSession's counters and spec; None for a name no session can have."""
        if name is None or not (0 < len(name) <= 64 and name.isascii() and name.isprintable()):
            return None
        state = self.unary("GetState", pb.GetStateRequest(session=name))
        info = self.unary("GetSession", pb.GetSessionRequest(name=name))
        for what, outcome in (("GetState", state), ("GetSession", info)):
            assert outcome.code in ALLOWED, f"{what} of {name!r}: {outcome.code} {outcome.details}"
        state_part = (
            state.response.SerializeToString(deterministic=True) if state.code == C.OK else _code_name(state.code)
        )
        if info.code != C.OK:
            return (state_part, _code_name(info.code))
        s = info.response
        return (
            state_part,
            (s.epoch, s.samples_this_epoch, s.correct_this_epoch, s.spec.SerializeToString(deterministic=True)),
        )

    def check_consistent(self, fixed: Fixed) -> None:
        """An accepted call leaves a state that could have been reached legitimately."""
        state = self.unary("GetState", pb.GetStateRequest(session=fixed.name))
        info = self.unary("GetSession", pb.GetSessionRequest(name=fixed.name))
        if state.code == C.NOT_FOUND and info.code == C.NOT_FOUND:
            return  # deleted
        assert state.code == C.OK and info.code == C.OK, (state.code, state.details, info.code, info.details)
        s, session = state.response, info.response
        assert s.epoch == session.epoch >= 0, (s.epoch, session.epoch)
        assert s.samples_this_epoch == session.samples_this_epoch, (s.samples_this_epoch, session.samples_this_epoch)
        assert 0 <= session.correct_this_epoch <= session.samples_this_epoch, (
            f"{fixed.name}: correct_this_epoch={session.correct_this_epoch} "
            f"samples_this_epoch={session.samples_this_epoch}"
        )
        if not fixed.ols:
            return
        supervise, accumulator, counts = decode(s.supervise), decode(s.accumulator), decode(s.counts)
        assert supervise.shape == accumulator.shape == (fixed.c, fixed.c) and counts.shape == (fixed.c,)
        assert np.isfinite(supervise).all(), f"{fixed.name}: S is not finite: {supervise.tolist()}"
        assert np.isfinite(accumulator).all() and (accumulator >= 0).all(), (
            f"{fixed.name}: accumulator {accumulator.tolist()}"
        )
        assert (counts >= 0).all(), f"{fixed.name}: counts {counts.tolist()}"
        total = sum(int(v) for v in counts.tolist())
        assert total == session.correct_this_epoch, (
            f"{fixed.name}: counts sum to {total} but correct_this_epoch={session.correct_this_epoch}"
        )

    def check_round_trip(self, fixed: Fixed) -> None:
        """A state the server holds is a checkpoint it must take back: LoadState of GetState's answer
        into a session of the same spec succeeds."""
        state = self.unary("GetState", pb.GetStateRequest(session=fixed.name))
        if state.code == C.NOT_FOUND:
            return  # deleted
        assert state.code == C.OK, (state.code, state.details)
        self.must("CreateSession", pb.CreateSessionRequest(name=ROUND_TRIP, spec=fixed.spec))
        try:
            loaded = self.unary("LoadState", pb.LoadStateRequest(session=ROUND_TRIP, state=state.response))
            assert loaded.code == C.OK, (
                f"{fixed.name}: LoadState of its own GetState answer {describe(state.response)} "
                f"answered {_code_name(loaded.code)}: {loaded.details}"
            )
        finally:
            self.must("DeleteSession", pb.DeleteSessionRequest(name=ROUND_TRIP))

    def check_serving(self, where: str) -> None:
        for service in ("", SERVICE):
            answer = self.health.Check(health_pb2.HealthCheckRequest(service=service), timeout=CALL_TIMEOUT)
            assert answer.status == health_pb2.HealthCheckResponse.SERVING, f"health of {service!r} {where}"
        anchor = self.unary("GetSession", pb.GetSessionRequest(name=ANCHOR.name))
        assert anchor.code == C.OK, f"GetSession of the untouched {ANCHOR.name} {where}: {anchor.code} {anchor.details}"
        assert anchor.response.spec.kind == ANCHOR.spec.kind and anchor.response.epoch == 0

    def reset(self, fixed: Fixed) -> None:
        """``fixed`` as created (delete, create), and every session that is not fixed deleted. Examples
        name no other fixed session. Unconditional: the barrier and the replay log are not in a snapshot."""
        deleted = self.unary("DeleteSession", pb.DeleteSessionRequest(name=fixed.name))
        assert deleted.code in (C.OK, C.NOT_FOUND), f"reset {fixed.name}: {deleted.code} {deleted.details}"
        self.must("CreateSession", pb.CreateSessionRequest(name=fixed.name, spec=fixed.spec))
        for session in self.must("ListSessions", pb.ListSessionsRequest()).sessions:
            if session.name not in FIXED_NAMES and session.name != ANCHOR.name:
                self.must("DeleteSession", pb.DeleteSessionRequest(name=session.name))

    # Running examples -----------------------------------------------------------------------

    def check_code(self, call: Call, code: grpc.StatusCode, details: str, where: str = "") -> None:
        allowed = set(ALLOWED)
        if call.rpc == "NextEpoch":
            allowed.add(C.DEADLINE_EXCEEDED)  # one rank of two waits for the other
        if call.may_exhaust:
            allowed.add(C.RESOURCE_EXHAUSTED)
        assert code in allowed, f"{call!r}{where} answered {_code_name(code)}: {details}"

    def run(self, fixed: Fixed, calls: list[Call]) -> None:
        if not self.clean:  # an example failed half-way: put every fixed session back
            for each in FIXED:
                self.reset(each)
                assert self.snapshot(each.name) == self.pristine[each.name], each.name
        self.clean = False
        try:
            previous: Outcome | None = None
            for index, call in enumerate(calls):
                if call.rpc == "LossStream":
                    self.run_stream(fixed, call)
                else:
                    previous = self.run_unary(fixed, call, previous if call.resend else None)
                self.check_serving(f"after call {index} ({call.rpc})")
        finally:
            self.reset(fixed)
        self.clean = True

    def run_unary(self, fixed: Fixed, call: Call, original: Outcome | None = None) -> Outcome:
        before = self.snapshot(call.target)
        timeout = BARRIER_TIMEOUT if call.rpc == "NextEpoch" else CALL_TIMEOUT
        outcome = self.unary(call.rpc, call.request, raw=call.raw, timeout=timeout)
        self.check_code(call, outcome.code, outcome.details)
        self.check_after(fixed, call, outcome.code == C.OK, before)
        if original is not None and original.code == C.OK and call.deduplicated(call.request):
            self.check_resend(call, call.request, original.response, outcome.code, outcome.response, before)
        return outcome

    def check_resend(
        self, call: Call, request: Any, original: Any, code: Any, answer: Any, before: tuple[Any, ...] | None
    ) -> None:
        """A resend of an applied request (same session, rank and request_id; or NextEpoch for the epoch
        it just finished) is accepted again, changes nothing, and gets the original answer (an upload's
        answer is the session as it is now, so only its acceptance and the state are compared)."""
        assert code == C.OK, f"{call!r}: the resend of an accepted request answered {_code_name(code)}"
        after = self.snapshot(call.target)
        assert after == before, f"{call!r}: the resend was applied again:\n{before}\n->\n{after}"
        if isinstance(request, (pb.LossRequest, pb.NextEpochRequest)):
            assert answer.SerializeToString(deterministic=True) == original.SerializeToString(deterministic=True), (
                f"{call!r}: the resend got another answer than the original:\n{describe(original)}\n{describe(answer)}"
            )

    def check_after(self, fixed: Fixed, call: Call, accepted: bool, before: tuple[Any, ...] | None) -> None:
        if not accepted:
            after = self.snapshot(call.target)
            assert after == before, f"rejected {call!r} changed session {call.target!r}:\n{before}\n->\n{after}"
        elif call.target in FIXED_NAMES:
            target = next(f for f in FIXED if f.name == call.target)
            self.check_consistent(target)
            if call.rpc in STATE_CHANGES:
                self.check_round_trip(target)

    def run_stream(self, fixed: Fixed, call: Call) -> None:
        """One request at a time, each answer read before the next is sent, so the state can be
        compared around each request."""
        requests: queue.Queue[Any] = queue.Queue()

        def feed() -> Iterator[Any]:
            while (item := requests.get()) is not None:
                yield item

        method = self.channel.stream_stream(f"/{SERVICE}/LossStream") if call.raw else self.stub.LossStream
        responses = method(feed(), timeout=4 * CALL_TIMEOUT)
        previous: Any = None
        try:
            for index, request in enumerate(call.request):
                target = _named_session("LossStream", request) if call.raw else request.session
                step = Call("LossStream", request, target, raw=call.raw)
                before = self.snapshot(target)
                requests.put(request)
                try:
                    answer = next(responses)
                except StopIteration:
                    pytest.fail(f"{call!r}: the stream ended after {index} of {len(call.request)} answers")
                except grpc.RpcError as error:
                    self.check_code(call, error.code(), error.details() or "", f" (the stream, at request {index})")
                    self.check_after(fixed, step, False, before)
                    return
                if call.raw:
                    answer = pb.LossResponse.FromString(answer)
                code = CODE_BY_VALUE.get(answer.error.code, answer.error.code)
                self.check_code(step, code, answer.error.message, f" (in-band, request {index} of the stream)")
                self.check_after(fixed, step, answer.error.code == 0, before)
                resent = index in call.resends and previous is not None and not previous.error.code
                if resent and call.deduplicated(request):
                    self.check_resend(call, request, previous, code if code else C.OK, answer, before)
                previous = answer
            requests.put(None)
            rest = list(responses)
            assert not rest, f"{call!r}: {len(rest)} answers more than requests"
        except grpc.RpcError as error:
            self.check_code(call, error.code(), error.details() or "", " (the stream's status)")
        finally:
            requests.put(None)
            responses.cancel()


@pytest.fixture(scope="module")
def harness(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Harness]:
    settings_ = Settings(
        host="127.0.0.1",
        port=0,
        device=TEST_DEVICE,
        store="sqlite",
        state_dir=tmp_path_factory.mktemp("fuzz-state"),
        workers=2,
        grace_seconds=1,
    )
    with (
        EmbeddedServer(settings_) as server,
        grpc.insecure_channel(server.target) as channel,
    ):
        stub = pb_grpc.LossServiceStub(channel)  # type: ignore[no-untyped-call]
        health = health_pb2_grpc.HealthStub(channel)
        h = Harness(server, channel, stub, health)
        for fixed in (*FIXED, ANCHOR):
            created = h.must("CreateSession", pb.CreateSessionRequest(name=fixed.name, spec=fixed.spec))
            assert created.created, fixed.name
        h.pristine = {fixed.name: h.snapshot(fixed.name) for fixed in FIXED}
        yield h


FUZZ = settings(
    derandomize=True,
    database=None,
    deadline=None,
    print_blob=False,
    # The harness fixture is module-scoped and every example resets what it touches.
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
)


def test_the_harness_sees_a_bad_answer(harness: Harness) -> None:
    """The checks can fail: a code outside the allowed set, and a rejection that changed the state, are caught."""
    fixed = FIXED[2]
    call = Call("GetSession", pb.GetSessionRequest(name=fixed.name), fixed.name)
    with pytest.raises(AssertionError, match="answered INTERNAL"):
        harness.check_code(call, C.INTERNAL, "boom")
    harness.reset(fixed)
    before = harness.snapshot(fixed.name)
    logits = tensor(pb.DTYPE_FLOAT32, [1, fixed.c], [3.0] + [0.0] * (fixed.c - 1))
    harness.must(
        "ComputeLoss",
        pb.LossRequest(session=fixed.name, logits=logits, labels=tensor(pb.DTYPE_INT64, [1], [0]), training=True),
    )
    try:
        with pytest.raises(AssertionError, match="changed session"):
            harness.check_after(fixed, call, False, before)
    finally:
        harness.reset(fixed)


# Examples per RPC: most for the ones with tensors and counters to get wrong.
UNARY_EXAMPLES = {
    "AddStatistics": 120,
    "ComputeLoss": 120,
    "CreateSession": 100,
    "DeleteSession": 25,
    "GetSession": 25,
    "GetSoftLabelHistory": 25,
    "GetSoftLabels": 40,
    "GetState": 25,
    "ListSessions": 15,
    "LoadState": 120,
    "NextEpoch": 50,
}


@pytest.mark.parametrize("rpc", sorted(UNARY_EXAMPLES))
def test_unary_rpc_survives_mutated_requests(harness: Harness, rpc: str) -> None:
    @settings(FUZZ, max_examples=UNARY_EXAMPLES[rpc])
    @given(example=unary_examples(rpc))
    def fuzz(example: tuple[Fixed, list[Call]]) -> None:
        harness.run(*example)

    fuzz()


@settings(FUZZ, max_examples=120)
@given(example=stream_examples())
def test_loss_stream_survives_mutated_requests(harness: Harness, example: tuple[Fixed, list[Call]]) -> None:
    harness.run(*example)


@settings(FUZZ, max_examples=150)
@given(example=raw_examples())
def test_every_rpc_survives_byte_level_messages(harness: Harness, example: tuple[Fixed, list[Call]]) -> None:
    harness.run(*example)
