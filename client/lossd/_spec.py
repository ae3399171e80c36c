"""The session spec: a typed, hashable mirror of ``lossd.v1.SessionSpec``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch

from lossd import _codec
from lossd.functional import DEFAULT_IGNORE_INDEX, Convention, EmptyClassPolicy, OlsInit, Reduction
from lossd.v1 import loss_service_pb2 as pb

LossKind = Literal["cross_entropy", "label_smoothing", "online_label_smoothing"]

# Enum names on the wire <-> the strings users write. Value 0 (UNSPECIFIED) maps to None.
KINDS: dict[str, int] = {
    "cross_entropy": pb.LOSS_KIND_CROSS_ENTROPY,
    "label_smoothing": pb.LOSS_KIND_LABEL_SMOOTHING,
    "online_label_smoothing": pb.LOSS_KIND_ONLINE_LABEL_SMOOTHING,
}
CONVENTIONS: dict[str, int] = {
    "uniform": pb.SMOOTHING_CONVENTION_UNIFORM,
    "off_target": pb.SMOOTHING_CONVENTION_OFF_TARGET,
}
REDUCTIONS: dict[str, int] = {"mean": pb.REDUCTION_MEAN, "sum": pb.REDUCTION_SUM, "none": pb.REDUCTION_NONE}
INITS: dict[str, int] = {
    "label_smoothing": pb.OLS_INIT_LABEL_SMOOTHING,
    "uniform": pb.OLS_INIT_UNIFORM,
    "zeros": pb.OLS_INIT_ZEROS,
}
EMPTY_CLASS_POLICIES: dict[str, int] = {
    "keep": pb.EMPTY_CLASS_POLICY_KEEP,
    "uniform": pb.EMPTY_CLASS_POLICY_UNIFORM,
    "zero": pb.EMPTY_CLASS_POLICY_ZERO,
}


def _to_wire(table: dict[str, int], option: str, value: str | None) -> Any:  # an enum ValueType
    if value is None:
        return 0
    try:
        return table[value]
    except KeyError:
        choices = ", ".join(repr(k) for k in table)
        raise ValueError(f"Expected `{option}` to be one of {choices} but got {value!r}") from None


def _from_wire(table: dict[str, int], value: int) -> str | None:
    for name, number in table.items():
        if number == value:
            return name
    return None


class ClassWeights:
    """Per-class weights as one read-only float64 tensor, comparable and hashable like the tuple it replaces.

    A tuple of 2^24 Python floats costs ~0.5 GiB; this costs 8 bytes a class.
    """

    __slots__ = ("_hash", "tensor")

    def __init__(self, values: Any) -> None:
        if isinstance(values, torch.Tensor):
            tensor = values.detach().to("cpu", torch.float64, copy=True).reshape(-1)
        else:
            tensor = torch.tensor(values, dtype=torch.float64).reshape(-1)
        tensor += 0.0  # -0.0 -> 0.0, so that equal weights hash equal
        self.tensor = tensor
        self._hash: int | None = None

    def __len__(self) -> int:
        return self.tensor.numel()

    def __iter__(self) -> Any:
        return iter(self.tensor.tolist())

    def __eq__(self, other: object) -> bool:
        if isinstance(other, tuple | list):
            other = ClassWeights(other)
        return isinstance(other, ClassWeights) and torch.equal(self.tensor, other.tensor)

    def __hash__(self) -> int:
        if self._hash is None:
            self._hash = hash(self.tensor.numpy().tobytes())
        return self._hash

    def __repr__(self) -> str:
        return f"ClassWeights({len(self)} classes)"


@dataclass(frozen=True)
class SessionSpec:
    """What a session computes. ``None`` leaves the choice to the server's default for the kind."""

    kind: LossKind
    n_classes: int
    smoothing: float = 0.0
    convention: Convention | None = None
    alpha: float | None = None
    reduction: Reduction = "mean"
    ignore_index: int = DEFAULT_IGNORE_INDEX
    weight: ClassWeights | tuple[float, ...] | None = None  # a tuple is stored as ClassWeights
    init: OlsInit | None = None
    empty_class: EmptyClassPolicy | None = None
    world_size: int = 1

    def __post_init__(self) -> None:
        if self.weight is not None and not isinstance(self.weight, ClassWeights):
            object.__setattr__(self, "weight", ClassWeights(self.weight))

    @property
    def weight_tensor(self) -> torch.Tensor | None:
        """The class weights as float64 [C] (shared: never write into it)."""
        return self.weight.tensor if isinstance(self.weight, ClassWeights) else None

    def to_proto(self) -> pb.SessionSpec:
        message = pb.SessionSpec(
            kind=_to_wire(KINDS, "kind", self.kind),
            n_classes=self.n_classes,
            smoothing=self.smoothing,
            convention=_to_wire(CONVENTIONS, "convention", self.convention),
            reduction=_to_wire(REDUCTIONS, "reduction", self.reduction),
            ignore_index=self.ignore_index,
            init=_to_wire(INITS, "init", self.init),
            empty_class=_to_wire(EMPTY_CLASS_POLICIES, "empty_class", self.empty_class),
            world_size=self.world_size,
        )
        if self.alpha is not None:
            message.alpha = self.alpha
        if self.weight is not None:
            assert isinstance(self.weight, ClassWeights)
            _codec.encode_into(message.weight, self.weight.tensor)
        return message

    @classmethod
    def from_proto(cls, message: pb.SessionSpec) -> SessionSpec:
        """Read a spec; unknown enum values become None and are for the server to reject."""
        weight = None
        if message.HasField("weight"):
            weight = ClassWeights(_codec.decode(message.weight, "spec.weight"))
        return cls(
            kind=_from_wire(KINDS, message.kind),  # type: ignore[arg-type]
            n_classes=message.n_classes,
            smoothing=message.smoothing,
            convention=_from_wire(CONVENTIONS, message.convention),  # type: ignore[arg-type]
            alpha=message.alpha if message.HasField("alpha") else None,
            reduction=_from_wire(REDUCTIONS, message.reduction) or "mean",  # type: ignore[arg-type]
            ignore_index=message.ignore_index if message.HasField("ignore_index") else DEFAULT_IGNORE_INDEX,
            weight=weight,
            init=_from_wire(INITS, message.init),  # type: ignore[arg-type]
            empty_class=_from_wire(EMPTY_CLASS_POLICIES, message.empty_class),  # type: ignore[arg-type]
            world_size=message.world_size or 1,
        )
