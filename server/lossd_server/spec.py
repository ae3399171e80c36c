"""Validate a wire SessionSpec and fill in every default, so equal specs compare equal."""

from __future__ import annotations

import dataclasses
import math

import torch

from lossd import _codec
from lossd._exceptions import InvalidArgumentError
from lossd._spec import CONVENTIONS, EMPTY_CLASS_POLICIES, INITS, KINDS, REDUCTIONS, SessionSpec
from lossd.v1 import loss_service_pb2 as pb

# Counts and sample totals that arrive from a client are at most this: exact in float64, and far enough
# from int64's 2^63 that no later sum of them can overflow.
MAX_COUNT = 1 << 53
MAX_EPOCH = 1 << 53
MAX_CLASSES = 1 << 24  # beyond this even a single row of logits is unreasonable
MAX_WORLD_SIZE = 1 << 16


FLOAT32_MAX = float(torch.finfo(torch.float32).max)


def finite_in_float32(tensor: torch.Tensor) -> bool:
    """Finite, and still finite once cast to float32 (1e300 is finite in float64 only)."""
    if not tensor.numel():
        return True
    low, high = torch.aminmax(tensor.detach().reshape(-1))
    return float(low) >= -FLOAT32_MAX and float(high) <= FLOAT32_MAX  # NaN fails both comparisons


def _check_enum(table: dict[str, int], field: str, value: int) -> None:
    if value != 0 and value not in table.values():
        raise InvalidArgumentError(f"spec.{field}: unknown value {value}")


def _check_weight(message: pb.SessionSpec, n_classes: int) -> None:
    try:
        weight = _codec.decode(message.weight, "spec.weight")
    except _codec.CodecError as error:
        raise InvalidArgumentError(str(error)) from None
    if not weight.is_floating_point():
        raise InvalidArgumentError(f"spec.weight: expected a floating point tensor but got {weight.dtype}")
    if tuple(weight.shape) != (n_classes,):
        raise InvalidArgumentError(f"spec.weight: expected shape [{n_classes}] but got {list(weight.shape)}")
    if not finite_in_float32(weight):
        raise InvalidArgumentError(
            "spec.weight: contains NaN, infinity or a value beyond float32's range (the loss math may run in float32)"
        )


def canonical_spec(message: pb.SessionSpec) -> SessionSpec:
    """The spec with defaults resolved, or InvalidArgumentError naming the first bad field."""
    _check_enum(KINDS, "kind", message.kind)
    if message.kind == 0:
        raise InvalidArgumentError(f"spec.kind: required, one of {', '.join(KINDS)}")
    for table, field in (
        (CONVENTIONS, "convention"),
        (REDUCTIONS, "reduction"),
        (INITS, "init"),
        (EMPTY_CLASS_POLICIES, "empty_class"),
    ):
        _check_enum(table, field, getattr(message, field))
    if not 2 <= message.n_classes <= MAX_CLASSES:
        raise InvalidArgumentError(
            f"spec.n_classes: expected 2 <= n_classes <= {MAX_CLASSES} but got {message.n_classes}"
        )
    if not (math.isfinite(message.smoothing) and 0.0 <= message.smoothing < 1.0):
        raise InvalidArgumentError(f"spec.smoothing: expected 0 <= smoothing < 1 but got {message.smoothing}")
    if message.HasField("weight"):
        _check_weight(message, message.n_classes)
    if not 0 <= message.world_size <= MAX_WORLD_SIZE:
        raise InvalidArgumentError(
            f"spec.world_size: expected 1 <= world_size <= {MAX_WORLD_SIZE} (0 means 1) but got {message.world_size}"
        )

    spec = SessionSpec.from_proto(message)
    ols = spec.kind == "online_label_smoothing"
    if spec.kind == "cross_entropy" and spec.smoothing != 0.0:
        raise InvalidArgumentError("spec.smoothing: must be 0 for cross_entropy; use label_smoothing")
    if ols:
        if spec.alpha is None:
            raise InvalidArgumentError("spec.alpha: required for online_label_smoothing")
        if not (math.isfinite(spec.alpha) and 0.0 <= spec.alpha <= 1.0):
            raise InvalidArgumentError(f"spec.alpha: expected 0 <= alpha <= 1 but got {spec.alpha}")
        return dataclasses.replace(
            spec,
            convention=spec.convention or "off_target",
            init=spec.init or "label_smoothing",
            empty_class=spec.empty_class or "keep",
        )
    for field in ("alpha", "init", "empty_class"):
        if getattr(spec, field) is not None:
            raise InvalidArgumentError(f"spec.{field}: only online_label_smoothing takes it")
    return dataclasses.replace(spec, convention=spec.convention or "uniform")
