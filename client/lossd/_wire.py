"""Hand-built protobuf wire format for the hot-path messages LossRequest and LossResponse.

Going through protobuf, a tensor payload is copied three or four times per direction
(``tobytes``, into the message, ``SerializeToString``; on the reading side into the
message and again on each ``.data`` access). Here the payload (``Tensor.data``) is
copied once when encoding, by one ``b"".join``, and not at all when decoding: the
decoder hands out memoryviews of the received buffer and lets protobuf parse only
the rest of the message.

Everything but the payloads is still serialised and parsed by protobuf, so the
schema may change around them. The code depends only on LossRequest's fields 2
(logits) and 3 (labels), LossResponse's field 3 (grad) and Tensor's field 3 (data),
checked against the descriptors at import. The encoders' output is byte-identical
to protobuf's (deterministic) serialisation of the same message, and the decoders
accept exactly what protobuf accepts, with protobuf's merge semantics.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import DecodeError

from lossd import _codec
from lossd.v1 import loss_service_pb2 as pb

_LOGITS = 2  # LossRequest.logits
_LABELS = 3  # LossRequest.labels
_GRAD = 3  # LossResponse.grad
_DATA = 3  # Tensor.data

_LENGTH_DELIMITED = 2
_START_GROUP = 3
_END_GROUP = 4


class WireError(ValueError):
    """Bytes that are not a valid serialised message (where protobuf would raise DecodeError)."""


def _check_schema() -> None:
    """Fail at import, not with silently wrong bytes, if the schema moved under the hard-coded field numbers."""
    expected = [
        (pb.LossRequest.DESCRIPTOR, _LOGITS, FieldDescriptor.TYPE_MESSAGE),
        (pb.LossRequest.DESCRIPTOR, _LABELS, FieldDescriptor.TYPE_MESSAGE),
        (pb.LossResponse.DESCRIPTOR, _GRAD, FieldDescriptor.TYPE_MESSAGE),
        (pb.Tensor.DESCRIPTOR, _DATA, FieldDescriptor.TYPE_BYTES),
    ]
    for message, number, kind in expected:
        field = message.fields_by_number.get(number)
        if (
            field is None
            or field.type != kind
            or field.is_repeated
            or field.containing_oneof is not None  # a oneof sibling would clear it: the decoder does not model that
            or (kind == FieldDescriptor.TYPE_MESSAGE and field.message_type is not pb.Tensor.DESCRIPTOR)
        ):
            raise ImportError(f"lossd._wire: {message.full_name} field {number} is not what the wire codec expects")


_check_schema()


def _wire_type(field: FieldDescriptor) -> int:
    if field.is_repeated and field.is_packed:
        return _LENGTH_DELIMITED
    kind = field.type
    if kind in (FieldDescriptor.TYPE_STRING, FieldDescriptor.TYPE_BYTES, FieldDescriptor.TYPE_MESSAGE):
        return _LENGTH_DELIMITED
    if kind == FieldDescriptor.TYPE_GROUP:
        return _START_GROUP
    if kind in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FIXED64, FieldDescriptor.TYPE_SFIXED64):
        return 1
    if kind in (FieldDescriptor.TYPE_FLOAT, FieldDescriptor.TYPE_FIXED32, FieldDescriptor.TYPE_SFIXED32):
        return 5
    return 0


def _leading_tags(message: Descriptor, below: int) -> frozenset[int]:
    """Tags protobuf writes for the known fields numbered below ``below``: the bytes that precede a tensor field.

    Protobuf writes known fields in field-number order and unknown fields last, so
    a serialisation splits before the tensor field at the end of its leading run of
    these tags. (Matching known tags, not just numbers, keeps an unknown field with
    a small number but another wire type where protobuf puts it: at the end.)
    """
    return frozenset((f.number << 3) | _wire_type(f) for f in message.fields if f.number < below)


_REQUEST_HEAD = _leading_tags(pb.LossRequest.DESCRIPTOR, _LOGITS)
_RESPONSE_HEAD = _leading_tags(pb.LossResponse.DESCRIPTOR, _GRAD)
_TENSOR_HEAD = _leading_tags(pb.Tensor.DESCRIPTOR, _DATA)

_LOGITS_TAG = bytes([_LOGITS << 3 | _LENGTH_DELIMITED])
_LABELS_TAG = bytes([_LABELS << 3 | _LENGTH_DELIMITED])
_GRAD_TAG = bytes([_GRAD << 3 | _LENGTH_DELIMITED])
_DATA_TAG = bytes([_DATA << 3 | _LENGTH_DELIMITED])

# ---------------------------------------------------------------- varints

_ONE_BYTE = [bytes([value]) for value in range(0x80)]


def _varint(value: int) -> bytes:
    """The base-128 varint of a non-negative ``value``."""
    if value < 0x80:
        return _ONE_BYTE[value]
    if value < 0x200000:  # the lengths of up to 2 MiB, without a loop
        if value < 0x4000:
            return bytes(((value & 0x7F) | 0x80, value >> 7))
        return bytes(((value & 0x7F) | 0x80, ((value >> 7) & 0x7F) | 0x80, value >> 14))
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _read_varint(buf: bytes | memoryview, pos: int, end: int) -> tuple[int, int]:
    """The varint at ``pos`` and the position after it; protobuf's limit of 10 bytes."""
    result = 0
    shift = 0
    while pos < end:
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7
        if shift == 70:
            raise WireError("varint longer than 10 bytes")
    raise WireError("truncated varint")


def _read_tag(buf: bytes | memoryview, pos: int, end: int) -> tuple[int, int]:
    """The tag at ``pos`` (at most 5 bytes and 32 bits, as protobuf requires) and the position after it."""
    byte = buf[pos]
    if byte < 0x80:
        return byte, pos + 1
    start = pos
    tag, pos = _read_varint(buf, pos, end)
    if pos - start > 5 or tag > 0xFFFFFFFF:
        raise WireError("tag longer than 32 bits")
    return tag, pos


def _read_length(buf: bytes | memoryview, pos: int, end: int) -> tuple[int, int]:
    """The end of the length-delimited value whose length starts at ``pos``, and where the value starts."""
    byte = buf[pos] if pos < end else 0x80
    if byte < 0x80:
        length, pos = byte, pos + 1
    else:
        start = pos
        length, pos = _read_varint(buf, pos, end)
        if pos - start > 5 or length > 0x7FFFFFFF:  # protobuf's limits
            raise WireError("length longer than 31 bits")
    if pos + length > end:
        raise WireError("field runs past the end of the message")
    return pos + length, pos


def _skip(buf: bytes | memoryview, tag: int, pos: int, end: int) -> int:
    """The end of the value of a field whose tag ended at ``pos`` (groups included, matched as protobuf does)."""
    wire_type = tag & 7
    if wire_type == 0:
        return _read_varint(buf, pos, end)[1]
    if wire_type == _LENGTH_DELIMITED:
        return _read_length(buf, pos, end)[0]
    if wire_type == 1:
        pos += 8
    elif wire_type == 5:
        pos += 4
    elif wire_type == _START_GROUP:
        return _skip_group(buf, tag >> 3, pos, end)
    elif wire_type == _END_GROUP:
        raise WireError("end-group tag without a start-group")
    else:
        raise WireError(f"invalid wire type {wire_type}")
    if pos > end:
        raise WireError("field runs past the end of the message")
    return pos


def _skip_group(buf: bytes | memoryview, number: int, pos: int, end: int) -> int:
    """The end of a group, validated no more than protobuf does: protobuf re-parses it, and caps its depth.

    Protobuf 7 (upb) accepts field number 0 inside unknown groups (newer upb refuses it).
    Either way, the only bytes that must be validated here are those protobuf never sees.
    """
    open_groups = [number]  # a list, not recursion: nesting depth is the sender's choice
    while open_groups:
        if pos >= end:
            raise WireError("unterminated group")
        tag, pos = _read_tag(buf, pos, end)
        wire_type = tag & 7
        if wire_type == _END_GROUP:
            if open_groups.pop() != tag >> 3:
                raise WireError("mismatched end-group tag")
        elif wire_type == _START_GROUP:
            open_groups.append(tag >> 3)
        else:
            pos = _skip(buf, tag, pos, end)
    return pos


def _split_point(data: bytes, leading: frozenset[int]) -> int:
    """Where the leading run of ``leading`` tags ends in protobuf's own (valid) serialisation ``data``."""
    pos = 0
    end = len(data)
    while pos < end:
        tag, after = _read_tag(data, pos, end)
        if tag not in leading:
            break
        pos = _skip(data, tag, after, end)
    return pos


# ---------------------------------------------------------------- encoding

_HEADER_CACHE_SIZE = 256
# (torch dtype, shape) -> the Tensor message without data, split where data goes. Shapes repeat step after step.
_headers: dict[tuple[torch.dtype, torch.Size], tuple[bytes, bytes]] = {}


def _header(tensor: torch.Tensor) -> tuple[bytes, bytes]:
    key = (tensor.dtype, tensor.shape)
    header = _headers.get(key)
    if header is None:
        serialized = pb.Tensor(dtype=_codec.wire_dtype(tensor.dtype), shape=tensor.shape).SerializeToString(
            deterministic=True
        )
        split = _split_point(serialized, _TENSOR_HEAD)
        header = serialized[:split], serialized[split:]
        if len(_headers) >= _HEADER_CACHE_SIZE:
            _headers.clear()
        _headers[key] = header
    return header


def _payload(tensor: torch.Tensor) -> memoryview:
    """The tensor's bytes without a copy when it is a contiguous CPU tensor (as :func:`_codec.byte_view`, faster)."""
    tensor = tensor.detach()
    if tensor.is_cpu and tensor.is_contiguous():
        if tensor.dtype == torch.bfloat16:  # numpy has no bfloat16; any 2-byte type has the same bytes
            tensor = tensor.view(torch.int16)
        return tensor.numpy().data
    return _codec.byte_view(tensor)


def _tensor_field(tag: bytes, tensor: torch.Tensor) -> tuple[bytes, memoryview | None, bytes]:
    """A tensor as a field of its parent: the bytes before the payload, the payload, the bytes after it."""
    before, after = _header(tensor)
    payload = _payload(tensor)
    nbytes = payload.nbytes
    if not nbytes:  # proto3 writes no empty bytes field
        body = before + after
        return tag + _varint(len(body)) + body, None, b""
    data_prefix = _DATA_TAG + _varint(nbytes)
    length = len(before) + len(data_prefix) + nbytes + len(after)
    return tag + _varint(length) + before + data_prefix, payload, after


def encode_loss_request(request: pb.LossRequest, logits: torch.Tensor, labels: torch.Tensor) -> bytes:
    """``request`` with ``logits`` and ``labels`` set, serialised, copying each payload once.

    ``request`` must not have logits or labels of its own. Byte-identical to
    ``SerializeToString(deterministic=True)`` of the message with both set by ``_codec.encode``.
    """
    serialized = request.SerializeToString(deterministic=True)
    split = _split_point(serialized, _REQUEST_HEAD)
    if split < len(serialized) and serialized[split] in (_LOGITS_TAG[0], _LABELS_TAG[0]):
        raise ValueError("encode_loss_request: the request already has logits or labels")
    logits_before, logits_payload, logits_after = _tensor_field(_LOGITS_TAG, logits)
    labels_before, labels_payload, labels_after = _tensor_field(_LABELS_TAG, labels)
    pieces: list[bytes | memoryview] = [serialized[:split] + logits_before]
    if logits_payload is not None:
        pieces.append(logits_payload)
    pieces.append(logits_after + labels_before)
    if labels_payload is not None:
        pieces.append(labels_payload)
    pieces.append(labels_after + serialized[split:])
    return b"".join(pieces)


def encode_loss_response(response: pb.LossResponse, grad: torch.Tensor | None) -> bytes:
    """``response`` with ``grad`` (already in its wire dtype) set, serialised, copying the gradient once.

    With ``grad`` None, just ``response`` serialised (a grad it has of its own, without
    data, is kept); otherwise ``response`` must not have a grad. Byte-identical to
    protobuf's deterministic serialisation of the same message.
    """
    serialized = response.SerializeToString(deterministic=True)
    if grad is None:
        return serialized
    split = _split_point(serialized, _RESPONSE_HEAD)
    if split < len(serialized) and serialized[split] == _GRAD_TAG[0]:
        raise ValueError("encode_loss_response: the response already has a grad")
    before, payload, after = _tensor_field(_GRAD_TAG, grad)
    if payload is None:
        return serialized[:split] + before + after + serialized[split:]
    return b"".join([serialized[:split] + before, payload, after + serialized[split:]])


# ---------------------------------------------------------------- decoding


@dataclasses.dataclass(frozen=True, slots=True)
class ReceivedRequest:
    """A parsed LossRequest whose tensors' ``data`` are left empty; their payloads are views of the received bytes."""

    message: pb.LossRequest
    logits_data: memoryview
    labels_data: memoryview


@dataclasses.dataclass(frozen=True, slots=True)
class ReceivedResponse:
    """A parsed LossResponse whose ``grad.data`` is left empty; the payload is a view of the received bytes."""

    message: pb.LossResponse
    grad_data: memoryview


_Occurrence = tuple[int, int, int, int]  # tag, where the field starts, where its value starts, where it ends
_DATA_TAGS = frozenset([_DATA << 3 | _LENGTH_DELIMITED])
_REQUEST_TENSOR_TAGS = frozenset([_LOGITS << 3 | _LENGTH_DELIMITED, _LABELS << 3 | _LENGTH_DELIMITED])
_RESPONSE_TENSOR_TAGS = frozenset([_GRAD << 3 | _LENGTH_DELIMITED])


def _find(buf: bytes | memoryview, pos: int, end: int, wanted: frozenset[int]) -> list[_Occurrence]:
    """The length-delimited fields tagged ``wanted`` among the fields of the message in ``buf[pos:end]``.

    Validates every tag and length on the way, as protobuf does. The per-field
    work is Python, so the common one-byte tags, lengths and varints are read inline.
    """
    found = []
    while pos < end:
        start = pos
        tag = buf[pos]
        pos += 1
        if tag >= 0x80:
            tag, pos = _read_tag(buf, start, end)
        if tag < 8:
            raise WireError("field number 0")
        wire_type = tag & 7
        if wire_type == _LENGTH_DELIMITED:
            length = shift = 0
            while True:  # _read_length, inlined
                if pos >= end:
                    raise WireError("truncated length")
                byte = buf[pos]
                pos += 1
                length |= (byte & 0x7F) << shift
                if byte < 0x80:
                    break
                shift += 7
                if shift == 35:
                    raise WireError("length longer than 31 bits")
            if length > 0x7FFFFFFF:
                raise WireError("length longer than 31 bits")
            value = pos
            pos += length
            if pos > end:
                raise WireError("field runs past the end of the message")
            if tag in wanted:
                found.append((tag, start, value, pos))
        elif wire_type == 0 and pos < end and buf[pos] < 0x80:
            pos += 1
        else:
            pos = _skip(buf, tag, pos, end)
    return found


def _strip(data: bytes | memoryview, tensor_tags: frozenset[int]) -> tuple[bytes, dict[int, memoryview]]:
    """``data`` without the ``data`` fields of its top-level Tensor fields tagged ``tensor_tags``, and those payloads.

    Every other byte is kept for protobuf to parse. A tensor field that occurs
    several times is merged by protobuf, so of its payloads the last one wins.
    """
    view = data if isinstance(data, memoryview) else memoryview(data)
    if view.format != "B" or view.ndim != 1 or not view.c_contiguous:
        view = view.cast("B")  # bytes as ints; TypeError unless C-contiguous
    buf = data if isinstance(data, bytes) else view  # indexing bytes is faster than indexing a memoryview
    payloads: dict[int, memoryview] = {}
    pieces: list[bytes | memoryview] = []
    run = 0
    for tag, start, value, stop in _find(buf, 0, len(view), tensor_tags):
        data_fields = _find(buf, value, stop, _DATA_TAGS)
        if not data_fields:
            continue  # a Tensor without data stays as it is
        _, _, data_start, data_stop = data_fields[-1]
        payloads[tag >> 3] = view[data_start:data_stop]
        pieces.append(view[run:start])
        length = stop - value
        kept = []  # the Tensor's other fields
        tensor_run = value
        for _, field_start, _, field_stop in data_fields:
            kept.append(view[tensor_run:field_start])
            length -= field_stop - field_start
            tensor_run = field_stop
        kept.append(view[tensor_run:stop])
        pieces.append(_varint(tag) + _varint(length))  # the tag made canonical, and the new length
        pieces += kept
        run = stop
    if not pieces:  # nothing to strip
        return data if isinstance(data, bytes) else bytes(view), payloads
    if len(view) > run:
        pieces.append(view[run:])
    return b"".join(pieces), payloads


def decode_loss_request(data: bytes | memoryview) -> ReceivedRequest:
    """Parse a LossRequest without copying the logits' and labels' payloads: see :class:`ReceivedRequest`."""
    stripped, payloads = _strip(data, _REQUEST_TENSOR_TAGS)
    try:
        message = pb.LossRequest.FromString(stripped)
    except DecodeError as error:
        raise WireError(str(error)) from None
    empty = memoryview(b"")
    return ReceivedRequest(message, payloads.get(_LOGITS, empty), payloads.get(_LABELS, empty))


def decode_loss_response(data: bytes | memoryview) -> ReceivedResponse:
    """Parse a LossResponse without copying the gradient's payload: see :class:`ReceivedResponse`."""
    stripped, payloads = _strip(data, _RESPONSE_TENSOR_TAGS)
    try:
        message = pb.LossResponse.FromString(stripped)
    except DecodeError as error:
        raise WireError(str(error)) from None
    return ReceivedResponse(message, payloads.get(_GRAD, memoryview(b"")))


_ITEMSIZE = {dtype: torch.empty((), dtype=dtype).element_size() for dtype in _codec._TO_WIRE}


def decode_tensor(message: pb.Tensor, data: memoryview, field: str = "tensor") -> torch.Tensor:
    """:func:`_codec.decode` with the payload given apart: a read-only CPU tensor viewing ``data``, not a copy."""
    dtype = _codec.torch_dtype(message, field)
    shape = tuple(message.shape)
    if shape and min(shape) < 0:
        raise _codec.CodecError(field, f"negative dimension in shape {list(shape)}")
    count = math.prod(shape)
    itemsize = _ITEMSIZE[dtype]
    nbytes = data.nbytes
    if nbytes != count * itemsize:
        raise _codec.CodecError(
            field, f"expected {count * itemsize} bytes for shape {list(shape)} of {dtype} but got {nbytes}"
        )
    if count == 0:
        return torch.empty(shape, dtype=dtype)
    flat = torch.frombuffer(data, dtype=dtype)
    return flat.view(*shape) if shape else flat.view(())  # view(*shape) is faster than reshape(shape)
