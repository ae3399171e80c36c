"""lossd._wire encodes what protobuf encodes, byte for byte, and decodes what protobuf decodes, payloads as views."""

from __future__ import annotations

import random
from typing import Any

import pytest
import torch
from google.protobuf.message import DecodeError

from lossd import _codec, _wire
from lossd.v1 import loss_service_pb2 as pb

LOGITS_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
LABELS_DTYPES = [torch.int64, torch.int32]
SHAPES = [(0, 5), (3, 7), (256, 1000)]
REQUEST_FIELDS: list[dict[str, Any]] = [
    {},
    {"session": "s", "training": True, "need_grad": True, "request_id": "r-1", "rank": 0},
    {"session": "sess", "need_grad": True, "rank": 2**62, "epoch": 0},
    {"session": "sess", "training": True, "request_id": "", "rank": 3, "epoch": 7},
    {"request_id": "ä" * 200, "epoch": 2**63 - 1},
    {"rank": -1, "epoch": -5},  # negative int64s: 10-byte varints
]


def _tensor(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    if dtype.is_floating_point:
        return torch.randn(shape, generator=generator).to(dtype)
    return torch.randint(-(2**31), 2**31 - 1, shape, generator=generator).to(dtype)


def _protobuf_request(fields: dict[str, Any], logits: torch.Tensor, labels: torch.Tensor) -> pb.LossRequest:
    return pb.LossRequest(**fields, logits=_codec.encode(logits), labels=_codec.encode(labels))


def _without_data(message: Any, *fields: str) -> Any:
    """A copy of a parsed message with the named Tensor fields' data cleared, and those data."""
    copy = type(message)()
    copy.CopyFrom(message)
    payloads = []
    for name in fields:
        if copy.HasField(name):  # clearing data of an absent field would make it present
            payloads.append(getattr(copy, name).data)
            getattr(copy, name).data = b""
        else:
            payloads.append(b"")
    return copy, payloads


def _assert_request_like_protobuf(data: bytes) -> _wire.ReceivedRequest | None:
    """decode_loss_request(data) gives protobuf's answer, or raises WireError exactly where protobuf raises."""
    try:
        reference = pb.LossRequest.FromString(data)
    except DecodeError:
        with pytest.raises(_wire.WireError):
            _wire.decode_loss_request(data)
        return None
    received = _wire.decode_loss_request(data)
    expected, (logits, labels) = _without_data(reference, "logits", "labels")
    assert received.message == expected
    assert received.message.SerializeToString() == expected.SerializeToString()  # unknown fields too, in order
    assert received.message.HasField("logits") == reference.HasField("logits")
    assert received.message.HasField("labels") == reference.HasField("labels")
    assert received.message.logits.data == b"" and received.message.labels.data == b""
    assert bytes(received.logits_data) == logits
    assert bytes(received.labels_data) == labels
    return received


def _assert_response_like_protobuf(data: bytes) -> _wire.ReceivedResponse | None:
    try:
        reference = pb.LossResponse.FromString(data)
    except DecodeError:
        with pytest.raises(_wire.WireError):
            _wire.decode_loss_response(data)
        return None
    received = _wire.decode_loss_response(data)
    expected, (grad,) = _without_data(reference, "grad")
    assert received.message == expected
    assert received.message.SerializeToString() == expected.SerializeToString()
    assert received.message.HasField("grad") == reference.HasField("grad")
    assert received.message.grad.data == b""
    assert bytes(received.grad_data) == grad
    # the loss (field 2) is left to protobuf, data and all
    assert received.message.loss.data == reference.loss.data
    return received


# ---------------------------------------------------------------- encoding


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("labels_dtype", LABELS_DTYPES, ids=str)
@pytest.mark.parametrize("logits_dtype", LOGITS_DTYPES, ids=str)
def test_request_encodes_as_protobuf_and_round_trips(
    logits_dtype: torch.dtype, labels_dtype: torch.dtype, shape: tuple[int, int]
) -> None:
    logits = _tensor(shape, logits_dtype, seed=1)
    labels = _tensor(shape[:1], labels_dtype, seed=2)
    for fields in REQUEST_FIELDS:
        encoded = _wire.encode_loss_request(pb.LossRequest(**fields), logits, labels)
        assert encoded == _protobuf_request(fields, logits, labels).SerializeToString(deterministic=True), fields
        received = _assert_request_like_protobuf(encoded)
        assert received is not None
        assert received.message.HasField("epoch") == ("epoch" in fields)
        decoded_logits = _wire.decode_tensor(received.message.logits, received.logits_data, "logits")
        decoded_labels = _wire.decode_tensor(received.message.labels, received.labels_data, "labels")
        assert decoded_logits.dtype == logits_dtype and decoded_logits.shape == logits.shape
        assert torch.equal(decoded_logits, logits) and torch.equal(decoded_labels, labels)


@pytest.mark.parametrize(
    "logits",
    [
        _tensor((7, 3), torch.float32, seed=3).T,  # not contiguous
        _tensor((4, 9), torch.bfloat16, seed=3)[:, ::2],
        _tensor((5, 6), torch.float16, seed=3).requires_grad_(),
        _tensor((2, 3, 4), torch.float32, seed=3),
        _tensor((), torch.float64, seed=3),  # no shape: the Tensor message has no field 2
        _tensor((1, 0), torch.float32, seed=3),
        _tensor((10, 10), torch.float32, seed=3)[3:5],  # contiguous with a storage offset
    ],
    ids=["transposed", "strided-bf16", "requires-grad", "3d", "scalar", "1x0", "offset"],
)
def test_request_encodes_any_layout(logits: torch.Tensor) -> None:
    labels = torch.arange(3, dtype=torch.int64)
    fields: dict[str, Any] = {"session": "s", "rank": 1}
    encoded = _wire.encode_loss_request(pb.LossRequest(**fields), logits, labels)
    assert encoded == _protobuf_request(fields, logits, labels).SerializeToString(deterministic=True)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_request_encodes_cuda_tensors() -> None:
    logits = _tensor((8, 5), torch.bfloat16, seed=4)
    labels = torch.arange(8)
    encoded = _wire.encode_loss_request(pb.LossRequest(session="s"), logits.cuda(), labels.cuda())
    assert encoded == _protobuf_request({"session": "s"}, logits, labels).SerializeToString(deterministic=True)


def test_request_encoding_keeps_unknown_fields_where_protobuf_puts_them() -> None:
    logits, labels = _tensor((2, 3), torch.float32, seed=5), torch.tensor([0, 2])
    # Unknown fields: number 1 with a varint (not the string session is), and number 99; known 1 and 7 around them.
    for raw in [b"\x08\x05", b"\x0a\x01s\x08\x05", b"\x98\x06\x01", b"\x0a\x01s\x38\x02\x98\x06\x01\x08\x05"]:
        request = pb.LossRequest.FromString(raw)
        expected = pb.LossRequest()
        expected.CopyFrom(request)
        expected.logits.CopyFrom(_codec.encode(logits))
        expected.labels.CopyFrom(_codec.encode(labels))
        assert _wire.encode_loss_request(request, logits, labels) == expected.SerializeToString(deterministic=True)


def test_request_encoding_refuses_a_request_with_tensors() -> None:
    logits, labels = torch.zeros(1, 2), torch.zeros(1, dtype=torch.int64)
    for name in ["logits", "labels"]:
        request = pb.LossRequest(session="s", rank=2)
        getattr(request, name).dtype = pb.DTYPE_FLOAT32
        with pytest.raises(ValueError, match="already has"):
            _wire.encode_loss_request(request, logits, labels)


def test_request_encoding_refuses_unsupported_dtypes() -> None:
    with pytest.raises(TypeError, match="dtype"):
        _wire.encode_loss_request(pb.LossRequest(), torch.zeros(2, 2, dtype=torch.uint8), torch.zeros(2))


@pytest.mark.parametrize("shape", [(), (0, 5), (3, 7), (256, 1000)], ids=str)
@pytest.mark.parametrize("dtype", LOGITS_DTYPES, ids=str)
def test_response_encodes_as_protobuf_and_round_trips(dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    grad = _tensor(shape, dtype, seed=6)
    loss = _codec.encode(torch.tensor(1.5))
    variants: list[dict[str, Any]] = [
        {},
        {"request_id": "r-9", "loss": loss, "n_used": 3, "n_correct": 1, "epoch": 4, "grad_exponent": -7},
        {"loss": loss, "grad_exponent": 12},
        {"request_id": "r", "error": pb.Error(code=3, message="bad")},
    ]
    for fields in variants:
        encoded = _wire.encode_loss_response(pb.LossResponse(**fields), grad)
        expected = pb.LossResponse(**fields, grad=_codec.encode(grad))
        assert encoded == expected.SerializeToString(deterministic=True), fields
        received = _assert_response_like_protobuf(encoded)
        assert received is not None
        assert torch.equal(_wire.decode_tensor(received.message.grad, received.grad_data, "grad"), grad)


def test_response_without_grad_is_the_plain_serialization() -> None:
    response = pb.LossResponse(request_id="r", n_used=2, loss=_codec.encode(torch.tensor(0.5)))
    assert _wire.encode_loss_response(response, None) == response.SerializeToString(deterministic=True)
    response.grad.dtype = pb.DTYPE_FLOAT16  # a grad the caller set itself is kept
    response.grad.shape.extend([2, 2])
    assert _wire.encode_loss_response(response, None) == response.SerializeToString(deterministic=True)
    with pytest.raises(ValueError, match="already has"):
        _wire.encode_loss_response(response, torch.zeros(2, 2, dtype=torch.float16))


def test_response_encoding_keeps_unknown_fields_where_protobuf_puts_them() -> None:
    grad = _tensor((2, 3), torch.float16, seed=7)
    # Unknown fields: number 2 as a varint (not the Tensor loss is), 99 and a fixed32 111; known 1, 2 and 4 around them.
    for raw in [
        b"\x10\x01",
        b"\x0a\x01r\x12\x00\x10\x01",
        b"\x98\x06\x01\x0a\x01r",
        b"\x20\x05\xfd\x06\x00\x00\x00\x00",
    ]:
        response = pb.LossResponse.FromString(raw)
        expected = pb.LossResponse()
        expected.CopyFrom(response)
        expected.grad.CopyFrom(_codec.encode(grad))
        assert _wire.encode_loss_response(response, grad) == expected.SerializeToString(deterministic=True)


def test_tensor_headers_are_cached_per_dtype_and_shape() -> None:
    request = pb.LossRequest(session="s")
    labels = torch.zeros(3, dtype=torch.int64)
    first = _wire.encode_loss_request(request, torch.ones(3, 4), labels)
    second = _wire.encode_loss_request(request, torch.ones(3, 4, dtype=torch.float16), labels)
    third = _wire.encode_loss_request(request, torch.ones(4, 3), labels)
    for encoded, logits in [(first, torch.ones(3, 4)), (second, torch.ones(3, 4).half()), (third, torch.ones(4, 3))]:
        assert encoded == _protobuf_request({"session": "s"}, logits, labels).SerializeToString(deterministic=True)


# ---------------------------------------------------------------- decoding what protobuf wrote otherwise


def _small_request() -> bytes:
    fields = {"session": "ab", "training": True, "need_grad": True, "request_id": "r1", "rank": 300, "epoch": 2}
    return _protobuf_request(fields, torch.arange(6.0).reshape(2, 3), torch.tensor([1, 2])).SerializeToString()


def test_repeated_tensor_fields_merge_as_protobuf_merges() -> None:
    first = _protobuf_request({"session": "a"}, torch.ones(2, 3), torch.tensor([1, 0])).SerializeToString()
    second = _protobuf_request(
        {"rank": 4}, torch.full((1, 2), 7.0, dtype=torch.float16), torch.tensor([5], dtype=torch.int32)
    ).SerializeToString()
    merged = _assert_request_like_protobuf(first + second)
    assert merged is not None
    assert list(merged.message.logits.shape) == [2, 3, 1, 2]  # shape entries append
    assert merged.message.logits.dtype == pb.DTYPE_FLOAT16
    assert bytes(merged.logits_data) == torch.full((2,), 7.0, dtype=torch.float16).numpy().tobytes()  # the last
    # a later occurrence without data keeps the earlier data
    without_data = pb.LossRequest(logits=pb.Tensor(shape=[9])).SerializeToString()
    kept = _assert_request_like_protobuf(first + without_data)
    assert kept is not None and bytes(kept.logits_data) == torch.ones(6).numpy().tobytes()
    # an empty data field later on does replace it
    empty_data = b"\x12\x02\x1a\x00"
    emptied = _assert_request_like_protobuf(first + empty_data)
    assert emptied is not None and bytes(emptied.logits_data) == b"" and emptied.message.HasField("logits")
    # data twice inside one occurrence, before the other fields, and an empty Tensor
    _assert_request_like_protobuf(b"\x12\x0a\x1a\x02ab\x08\x01\x1a\x02cd\x12\x00\x1a\x00")


def test_unknown_and_unusual_encodings_decode_as_protobuf_does() -> None:
    base = _small_request()
    cases = [
        base + b"\x98\x06\x01",  # unknown varint field 99
        b"\xf8\xff\xff\xff\x07\x01" + base,  # the largest field number
        base + b"\x4b\x08\x01\x53\x1a\x00\x54\x4c",  # unknown nested groups
        base + b"\x49" + bytes(8) + b"\x4d" + bytes(4),  # unknown fixed64 and fixed32
        b"\x10\x05" + base,  # field 2 as a varint: an unknown field, not logits
        b"\x13\x08\x01\x14" + base,  # field 2 as a group: unknown too
        b"\x12\x06\x10\x02\x10\x03\x1a\x00",  # unpacked shape
        b"\x12\x07\x12\x02\x02\x03\x1a\x01x",  # packed shape
        b"\x92\x80\x00\x07\x08\x01\x9a\x00\x02hi",  # overlong tags for logits and data
        b"\x12\x87\x80\x00\x1a\x83\x80\x00abc",  # overlong lengths
        b"\x1a\x05\x1a\x03xyz" + b"\x12\x00",  # labels before logits
        b"\x12\x0c\x98\x06\x01\x1a\x01q\xfd\x06\x00\x00\x00\x00",  # unknown fields inside the Tensor, around data
        b"\x12\x08\x0b\x1a\x02ab\x0c\x1a\x00",  # a data-looking field inside a group is the group's
        b"\x12\x02\x18\x05",  # data as a varint: unknown
        b"\x12\x05\x82\x01\x02\x08\x01",  # a message-like unknown field 16 in the Tensor
        b"\x4b" * 20 + b"\x4c" * 20 + b"\x12\x2a" + b"\x0b" * 20 + b"\x0c" * 20 + b"\x1a\x00",  # nested groups
    ]
    for data in cases:
        received = _assert_request_like_protobuf(data)
        assert received is not None, data  # all of these are valid
    # Field number 0 inside an unknown group: protobuf 7.36 accepts it, newer upb refuses it. Either way, agree.
    _assert_request_like_protobuf(base + b"\x4b\x03\x04\x00\x00\x4c")
    _assert_request_like_protobuf(b"\x12\x08\x0b\x03\x04\x00\x00\x0c\x1a\x00")


def test_response_decodes_merged_and_unknown_fields_as_protobuf_does() -> None:
    grad = _codec.encode(torch.arange(4, dtype=torch.float16))
    base = pb.LossResponse(request_id="x", loss=_codec.encode(torch.tensor(2.0)), grad=grad, n_used=3)
    serialized = base.SerializeToString()
    for data in [
        serialized,
        serialized * 2,
        serialized + pb.LossResponse(grad=pb.Tensor(data=b"zz")).SerializeToString(),
        b"\x1a\x00" + serialized + b"\x98\x06\x01",
        serialized + b"\x12\x02\x1a\x00",  # loss data replaced: left to protobuf
    ]:
        assert _assert_response_like_protobuf(data) is not None


# ---------------------------------------------------------------- malformed input


MALFORMED = [
    b"\x0a",  # truncated length
    b"\x0a\x05ab",  # length past the end
    b"\x38\xff",  # truncated varint
    b"\x38" + b"\xff" * 10 + b"\x01",  # an 11-byte varint
    b"\x00\x01",  # field 0
    b"\x02\x00",
    b"\xa0\x80\x80\x80\x80\x00\x01",  # a 6-byte tag
    b"\xa0\x80\x80\x80\x10\x01",  # a tag above 32 bits
    b"\x26",  # wire type 6
    b"\x27",  # wire type 7
    b"\x24",  # end-group without start
    b"\x4b\x08\x01",  # unterminated group
    b"\x4b\x08\x01\x54",  # mismatched end-group
    b"\x4b\x00\x4c",  # field 0 inside a group
    b"\x49\x00\x00",  # truncated fixed64
    b"\x4d\x00",  # truncated fixed32
    b"\x12\x04\x1a\x05ab",  # data past the end of its Tensor
    b"\x12\x03\x1a\x01",  # data truncated
    b"\x12\x01\x24",  # end-group inside the Tensor
    b"\x12\x02\x0f\x00",  # wire type 7 inside the Tensor
    b"\x12\x02\x00\x00",  # field 0 inside the Tensor
    b"\x12\x03\x08\x01\x9a\x00",  # a Tensor ending in the middle of a tag
    b"\x12\x05\x08\x01\x1a\x80\x80",  # a data length cut short
    b"\x1a\x01\xff",  # labels with a truncated tag
    b"\x0a\x01\xff",  # session with bad UTF-8: protobuf's own error
    b"\x12\x01\x0a" + bytes(1),  # dtype as a length-delimited field past the Tensor
    b"\x12\x81\x80\x80\x80\x80\x00\x00",  # a 6-byte length (protobuf allows 5) on logits
    b"\x12\x08\x1a\x81\x80\x80\x80\x80\x00x",  # and on data, which protobuf never sees here
    b"\x1a\x07\x9a\x80\x80\x80\x80\x00\x00",  # a 6-byte data tag
    b"\x4b" * 1000 + b"\x4c" * 1000,  # groups nested past protobuf's depth limit
    b"\x12\x80\x0f" + b"\x0b" * 960 + b"\x0c" * 960,  # the same inside the Tensor
]


@pytest.mark.parametrize("data", MALFORMED, ids=lambda data: data.hex())
def test_malformed_request_raises_wire_error(data: bytes) -> None:
    with pytest.raises(DecodeError):
        pb.LossRequest.FromString(data)  # the case really is malformed
    with pytest.raises(_wire.WireError):
        _wire.decode_loss_request(data)


@pytest.mark.parametrize("data", MALFORMED, ids=lambda data: data.hex())
def test_malformed_response_raises_wire_error(data: bytes) -> None:
    # field 3 is grad here; field 1's UTF-8 applies too
    data = data.replace(b"\x12", b"\x1a", 1) if data.startswith(b"\x12") else data
    try:
        pb.LossResponse.FromString(data)
    except DecodeError:
        with pytest.raises(_wire.WireError):
            _wire.decode_loss_response(data)
    else:
        assert _assert_response_like_protobuf(data) is not None


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"\x00\x01", "field number 0"),
        (b"\x12\x02\x00\x00", "field number 0"),
        (b"\x38\xff", "truncated varint"),
        (b"\x12\x04\x1a\x05ab", "past the end"),
        (b"\x26", "wire type 6"),
        (b"\x24", "end-group"),
        (b"\x4b\x08\x01\x54", "mismatched end-group"),
        (b"\x4b\x08\x01", "unterminated group"),
        (b"\x38" + b"\xff" * 10 + b"\x01", "longer than 10 bytes"),
        (b"\x0a\x01\xff", "UTF-8"),  # protobuf's own message
    ],
)
def test_wire_errors_say_what_is_wrong(data: bytes, message: str) -> None:
    with pytest.raises(_wire.WireError, match=message):
        _wire.decode_loss_request(data)


def test_every_truncation_decodes_as_protobuf_or_raises() -> None:
    """A cut at a field boundary is a valid, shorter message to protobuf and here; anywhere else both refuse it."""
    request = _small_request()
    outcomes = [_assert_request_like_protobuf(request[:cut]) is not None for cut in range(len(request) + 1)]
    assert outcomes[0] and outcomes[-1] and not all(outcomes)
    response = pb.LossResponse(
        request_id="r", loss=_codec.encode(torch.tensor(1.0)), grad=_codec.encode(torch.ones(2, 2)), n_used=2
    ).SerializeToString()
    outcomes = [_assert_response_like_protobuf(response[:cut]) is not None for cut in range(len(response) + 1)]
    assert outcomes[0] and outcomes[-1] and not all(outcomes)


def test_random_mutations_decode_as_protobuf_or_raise() -> None:
    """Seeded differential fuzzing: flipped, inserted and deleted bytes, on messages with groups and unknown fields."""
    rng = random.Random(20240611)
    seeds = [
        _small_request(),
        _small_request() + b"\x4b\x08\x01\x53\x1a\x00\x54\x4c" + b"\x12\x06\x1a\x02ab\x10\x07",
        b"\x12\x08\x0b\x1a\x02ab\x0c\x1a\x00\x1a\x05\x10\x01\x1a\x01z\x49" + bytes(8),
    ]
    interesting = [0x00, 0x02, 0x03, 0x04, 0x08, 0x0A, 0x0B, 0x0C, 0x12, 0x1A, 0x1B, 0x1C, 0x7F, 0x80, 0xFF]
    valid = invalid = 0
    for _ in range(3000):
        data = bytearray(rng.choice(seeds))
        for _ in range(rng.randint(1, 3)):
            position = rng.randrange(len(data) + 1)
            byte = rng.choice(interesting) if rng.random() < 0.6 else rng.randrange(256)
            operation = rng.random()
            if operation < 0.5 and position < len(data):
                data[position] = byte
            elif operation < 0.8:
                data.insert(position, byte)
            elif position < len(data):
                del data[position]
        if _assert_request_like_protobuf(bytes(data)) is None:
            invalid += 1
        else:
            valid += 1
        if _assert_response_like_protobuf(bytes(data)) is None:
            invalid += 1
        else:
            valid += 1
    assert valid > 500 and invalid > 500  # both outcomes exercised


# ---------------------------------------------------------------- zero copy and decode_tensor


def test_payloads_are_views_of_the_input() -> None:
    encoded = _small_request()
    received = _wire.decode_loss_request(encoded)
    assert received.logits_data.obj is encoded and received.labels_data.obj is encoded
    buffer = bytearray(encoded)
    received = _wire.decode_loss_request(memoryview(buffer))
    logits = _wire.decode_tensor(received.message.logits, received.logits_data, "logits")
    labels = _wire.decode_tensor(received.message.labels, received.labels_data, "labels")
    assert torch.equal(logits, torch.arange(6.0).reshape(2, 3)) and torch.equal(labels, torch.tensor([1, 2]))
    start = encoded.index(torch.arange(6.0).numpy().tobytes())
    buffer[start : start + 4] = torch.tensor([42.0]).numpy().tobytes()  # the tensor sees the buffer change
    assert logits[0, 0].item() == 42.0
    grad = torch.arange(6.0, dtype=torch.bfloat16)
    response = _wire.encode_loss_response(pb.LossResponse(request_id="r"), grad)
    view = _wire.decode_loss_response(memoryview(response)).grad_data
    assert view.obj is response and bytes(view) == grad.view(torch.int16).numpy().tobytes()


def test_absent_payloads_are_empty_views() -> None:
    received = _wire.decode_loss_request(pb.LossRequest(session="s").SerializeToString())
    assert isinstance(received.logits_data, memoryview) and received.logits_data.nbytes == 0
    assert not received.message.HasField("logits") and received.labels_data.nbytes == 0
    response = _wire.decode_loss_response(b"")
    assert response.grad_data.nbytes == 0 and not response.message.HasField("grad")


def test_decode_accepts_a_memoryview_of_any_format() -> None:
    encoded = _small_request()
    encoded += b"\xfa\x06" + _wire._varint(-(len(encoded) + 3) % 4) + bytes(-(len(encoded) + 3) % 4)  # pad: field 111
    words = memoryview(bytearray(encoded)).cast("I")
    received = _wire.decode_loss_request(words)
    assert bytes(received.labels_data) == torch.tensor([1, 2]).numpy().tobytes()
    assert received.message == _wire.decode_loss_request(encoded).message
    signed = memoryview(encoded).cast("b")  # indexes as negative numbers
    assert _wire.decode_loss_request(signed).message == received.message
    with pytest.raises(TypeError):
        _wire.decode_loss_request(memoryview(encoded * 2)[::2])  # not contiguous


def _codec_error(message: pb.Tensor) -> str:
    with pytest.raises(_codec.CodecError) as caught:
        _codec.decode(message, "logits")
    return str(caught.value)


@pytest.mark.parametrize(
    "message",
    [
        pb.Tensor(dtype=pb.DTYPE_UNSPECIFIED, shape=[1], data=b"\0\0\0\0"),
        pb.Tensor(dtype=pb.DType.ValueType(99), shape=[1], data=b"\0\0\0\0"),
        pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[2, -1], data=b""),
        pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[2, 3], data=bytes(20)),
        pb.Tensor(dtype=pb.DTYPE_BFLOAT16, shape=[0, 3], data=bytes(2)),
        pb.Tensor(dtype=pb.DTYPE_INT64, shape=[], data=bytes(4)),
    ],
    ids=["unspecified", "unknown", "negative", "short", "empty-with-bytes", "scalar-short"],
)
def test_decode_tensor_raises_what_codec_raises(message: pb.Tensor) -> None:
    expected = _codec_error(message)
    data = memoryview(message.data)
    message.data = b""
    with pytest.raises(_codec.CodecError) as caught:
        _wire.decode_tensor(message, data, "logits")
    assert str(caught.value) == expected and caught.value.field == "logits"


@pytest.mark.parametrize("shape", [(), (0,), (3, 0), (2, 3)], ids=str)
@pytest.mark.parametrize("dtype", LOGITS_DTYPES + LABELS_DTYPES, ids=str)
def test_decode_tensor_matches_codec(dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    message = _codec.encode(_tensor(shape, dtype, seed=8))
    expected = _codec.decode(message, "t")
    data = memoryview(message.data)
    message.data = b""
    decoded = _wire.decode_tensor(message, data, "t")
    assert decoded.dtype == expected.dtype and decoded.shape == expected.shape and torch.equal(decoded, expected)
