"""The local transport's wire format, shared by client and server (docs/local-transport.md).

One Unix SOCK_SEQPACKET connection per client: every send is one message, and a
message travels with the descriptors passed alongside it (SCM_RIGHTS). The first
message is an attach, carrying the sealed memfd segment; each later one is a step
whose tensors lie in that segment. Every message is answered by one reply. Integers
are little-endian; strings follow the fixed part, their lengths in it.
"""

from __future__ import annotations

import fcntl
import os
import struct

import torch

PROTOCOL_VERSION = 1
ALIGN = 64  # tensor offsets in the segment: cache-line aligned, so every dtype is aligned too
MAX_MESSAGE = 4096 + 512  # the longest message either side sends: a reply with a 4 KiB status message
TICKET_BYTES = 32
# A segment must be sealed against shrinking (a mapping past the end would SIGBUS) and growing.
REQUIRED_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW

ATTACH_MAGIC = 0x4154_534C  # "LSTA"
STEP_MAGIC = 0x5053_534C  # "LSSP"
REPLY_MAGIC = 0x5052_534C  # "LSRP"

# magic, version, segment bytes, ticket
ATTACH = struct.Struct(f"<IIQ{TICKET_BYTES}s")
# magic, flags, rank, epoch, logits dtype, labels dtype, session length, request id length,
# N, C, logits / labels / gradient / loss offsets, gradient / loss capacities
STEP = struct.Struct("<IIqqBBHHxxqqQQQQQQ")
# magic, status code, grad exponent, loss dtype, grad dtype, flags, message length,
# n_used, n_correct, epoch, loss (scalar reductions), loss elements in the segment (reduction none)
REPLY = struct.Struct("<IiiBBBxIqqqdq")

TRAINING = 1
NEED_GRAD = 2
HAS_EPOCH = 4
STEP_FLAGS = TRAINING | NEED_GRAD | HAS_EPOCH

# Reply flags
GRAD_IN_SEGMENT = 1
LOSS_IN_SEGMENT = 2  # reduction none: the [N] losses are at the step's loss offset

# The wire dtypes, by the lossd.v1 DType numbers, so both transports speak the same codes.
DTYPES: dict[int, torch.dtype] = {
    1: torch.float32,
    2: torch.float16,
    3: torch.bfloat16,
    4: torch.int64,
    5: torch.int32,
    6: torch.float64,
}
CODES: dict[torch.dtype, int] = {dtype: code for code, dtype in DTYPES.items()}


class ProtocolError(ValueError):
    """A message that breaks the format: the connection cannot be trusted to stay in step."""


def align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def segment_size(needed: int) -> int:
    """Room for ``needed`` bytes with headroom, so a slightly bigger batch reuses the segment:
    the next power of two, at least 1 MiB."""
    return max(1 << 20, 1 << (max(needed, 1) - 1).bit_length())


def create_segment(size: int) -> int:
    """A sealed memfd of ``size`` bytes: a descriptor that the caller owns and closes."""
    fd = os.memfd_create("lossd-segment", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        # Reserve the pages now: on a full tmpfs (or past a memory limit) a plain ftruncate succeeds
        # and the first touch of the mapping is SIGBUS instead of an error here.
        os.posix_fallocate(fd, 0, size)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, REQUIRED_SEALS | fcntl.F_SEAL_SEAL)
    except BaseException:
        os.close(fd)
        raise
    return fd


def pack_reply(
    code: int,
    message: str = "",
    *,
    grad_exponent: int = 0,
    loss_dtype: int = 0,
    grad_dtype: int = 0,
    flags: int = 0,
    n_used: int = 0,
    n_correct: int = 0,
    epoch: int = 0,
    loss: float = 0.0,
    loss_elements: int = 0,
) -> bytes:
    text = message.encode("utf-8", "replace")[: MAX_MESSAGE - REPLY.size]
    fixed = REPLY.pack(
        REPLY_MAGIC,
        code,
        grad_exponent,
        loss_dtype,
        grad_dtype,
        flags,
        len(text),
        n_used,
        n_correct,
        epoch,
        loss,
        loss_elements,
    )
    return fixed + text
