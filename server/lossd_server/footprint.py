"""What a session's matrices cost, and which budget pays for them (the arithmetic of docs/limits.md).

The matrices and their transient copies are charged where they live: on a CUDA server to the
``device`` account, on a CPU server to ``state`` (held between calls) and ``requests`` (an epoch's
end, a snapshot's staging copy). Copies made for an answer (GetState, GetSoftLabels) are host
memory on either, charged to ``requests`` by the servicer.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

from lossd._exceptions import ResourceExhaustedError
from lossd._kernels import KernelUnavailableError, MathKernel
from lossd._spec import SessionSpec
from lossd_server.memory import MemoryAccount

SOFT_LABEL_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def _ols(spec: SessionSpec) -> bool:
    return spec.kind == "online_label_smoothing"


def state_bytes(spec: SessionSpec, soft_dtype: torch.dtype = torch.float32) -> int:
    """What the session holds: S in ``soft_dtype``, float64 accumulator, int64 counts, float64 class weights.
    With the default float32 it is also what the session's matrices take on the wire and in the store."""
    c = spec.n_classes
    weights = 8 * c if spec.weight is not None else 0
    if not _ols(spec):
        return weights
    return c * c * (soft_dtype.itemsize + 8) + c * 8 + weights


def epoch_end_bytes(spec: SessionSpec) -> int:
    """Transient memory of finishing an epoch: 12 C^2 whatever S's dtype. The float64 average and its
    float32 rounding (8 + 4), then the float32 S with the kept rows (4 + 4, and 4 to widen a bfloat16 S);
    a bfloat16 S is rounded from the float32 one (4 + 2), and widened again for the store (2 + 4)."""
    return 12 * spec.n_classes**2 if _ols(spec) else 0


def snapshot_bytes(spec: SessionSpec) -> int:
    """The staging copy a snapshot takes of the accumulator and counts."""
    return 8 * spec.n_classes**2 + 8 * spec.n_classes if _ols(spec) else 0


@dataclass(frozen=True)
class Budgets:
    """The accounts a session's costs go to. ``device`` is set on a CUDA server, None on the CPU."""

    state: MemoryAccount
    work: MemoryAccount
    device: MemoryAccount | None = None

    @property
    def matrices(self) -> MemoryAccount:
        """Pays for what the session holds between calls."""
        return self.device or self.state

    @property
    def transients(self) -> MemoryAccount:
        """Pays for the copies of the matrices an epoch end or a snapshot makes, where the matrices are."""
        return self.device or self.work


def transient_bytes(spec: SessionSpec) -> int:
    """The most an epoch end or a snapshot of the session copies at once."""
    return max(epoch_end_bytes(spec), snapshot_bytes(spec))


def check_fits(
    name: str,
    spec: SessionSpec,
    budgets: Budgets,
    soft_dtype: torch.dtype,
    *,
    resident: Iterable[SessionSpec] = (),
    resident_bytes: int = 0,
) -> int:
    """The bytes to reserve for the session's state; RESOURCE_EXHAUSTED if its epoch end or snapshot could
    never fit its budget, even with nothing else in it (better refused at creation than at its first epoch).

    On a device the matrices share one account with their transient copies, so a session is also refused
    when, beside the ``resident_bytes`` that the ``resident`` sessions hold, it would leave too little room
    for the largest epoch end or snapshot among them and it: admitting it must not starve another's."""
    held, transient = state_bytes(spec, soft_dtype), transient_bytes(spec)
    account = budgets.transients
    alone = transient + (held if budgets.device is not None else 0)
    if alone > account.limit:
        what = "hold its matrices and " if budgets.device is not None else ""
        raise ResourceExhaustedError(
            f"session {name!r} (n_classes={spec.n_classes}) needs {alone} bytes of {account.name} memory to "
            f"{what}finish an epoch or snapshot its statistics, more than {account.setting}={account.limit}"
        )
    headroom = max([transient, *(transient_bytes(other) for other in resident)])
    if budgets.device is not None and resident_bytes + held + headroom > account.limit:
        raise ResourceExhaustedError(
            f"session {name!r} needs {held} bytes of matrices (n_classes={spec.n_classes}); the sessions in "
            f"device memory hold {resident_bytes} and their epoch ends need {headroom} more, of "
            f"{account.setting}={account.limit}"
        )
    return held


def ols_math_kernel(kernel: MathKernel, soft_dtype: torch.dtype, device: torch.device) -> MathKernel:
    """The loss math of an OLS session whose S is held in ``soft_dtype``. The CPU's fused kernel (numba, which
    has no bfloat16) reads S as a float32 table, so a bfloat16 S would be widened whole, C^2 entries (4 GB at
    C = 32000), at every call: there the eager math runs, which widens only the batch's N rows, and
    math_kernel='fused' cannot be met. CUDA's fused kernel (Triton) reads a bfloat16 S as it is."""
    if device.type != "cpu" or soft_dtype == torch.float32:
        return kernel
    if kernel == "fused":
        raise KernelUnavailableError(
            "math_kernel='fused' with soft_label_dtype=bfloat16 on the CPU: the CPU's fused kernel reads S in "
            "float32 (use math_kernel auto or eager, where OLS sessions run the eager math, or a CUDA device)"
        )
    return "eager" if kernel == "auto" else kernel  # eager, or a backend a test hands over
