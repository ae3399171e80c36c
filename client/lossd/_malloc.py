"""glibc malloc thresholds for a process that moves megabyte tensors on every request.

Above glibc's default 128 KiB mmap threshold every tensor and every serialised
message is a fresh mmap whose pages fault in on first touch and are unmapped on
free. Measured on a 2-core machine: serialising a 1 MB response took 1.15 ms
with the defaults and 0.10 ms with these settings; the loss math at 256 x 1000
took about half as long. The cost is up to ``trim_threshold`` bytes of freed
heap kept for reuse.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2
M_MMAP_THRESHOLD = -3

MiB = 1 << 20


def tune_malloc(mmap_threshold: int = 256 * MiB, trim_threshold: int = 512 * MiB, top_pad: int = 64 * MiB) -> bool:
    """Apply the thresholds with mallopt; False where the C library is not glibc."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    settings = ((M_MMAP_THRESHOLD, mmap_threshold), (M_TRIM_THRESHOLD, trim_threshold), (M_TOP_PAD, top_pad))
    return all(mallopt(option, value) == 1 for option, value in settings)


_tuned_for_client = False


def tune_client_once() -> None:
    """The client moves the same megabyte buffers per step (encode, serialise, decode), so it gains as much.

    Applied once per process when the first Client is made; ``LOSSD_TUNE_MALLOC=false``
    (the variable the server reads too) leaves the process's malloc alone.
    """
    global _tuned_for_client
    if _tuned_for_client:
        return
    _tuned_for_client = True
    if os.environ.get("LOSSD_TUNE_MALLOC", "true").strip().lower() not in ("0", "false", "no", "off"):
        tune_malloc()
