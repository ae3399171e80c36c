"""lossd: cross-entropy, label smoothing and Online Label Smoothing computed by a lossd server.

Change one import::

    from lossd import OnlineLabelSmoothing
    criterion = OnlineLabelSmoothing(alpha=0.5, n_classes=100, smoothing=0.1)
"""

from lossd import functional
from lossd._client import Client
from lossd._config import ClientConfig, TLSConfig
from lossd._exceptions import (
    AbortedError,
    AlreadyExistsError,
    CancelledError,
    DeadlineExceededError,
    FailedPreconditionError,
    InternalError,
    InvalidArgumentError,
    LossdError,
    NotFoundError,
    PermissionDeniedError,
    ResourceExhaustedError,
    UnauthenticatedError,
    UnavailableError,
    UnimplementedError,
)
from lossd._spec import SessionSpec
from lossd._stream import LossStream
from lossd._types import LossResult, SessionInfo, SessionState
from lossd.nn import CrossEntropyLoss, LabelSmoothingLoss, OnlineLabelSmoothing, RemoteLoss

__all__ = [
    "AbortedError",
    "AlreadyExistsError",
    "CancelledError",
    "Client",
    "ClientConfig",
    "CrossEntropyLoss",
    "DeadlineExceededError",
    "FailedPreconditionError",
    "InternalError",
    "InvalidArgumentError",
    "LabelSmoothingLoss",
    "LossResult",
    "LossStream",
    "LossdError",
    "NotFoundError",
    "OnlineLabelSmoothing",
    "PermissionDeniedError",
    "RemoteLoss",
    "ResourceExhaustedError",
    "SessionInfo",
    "SessionSpec",
    "SessionState",
    "TLSConfig",
    "UnauthenticatedError",
    "UnavailableError",
    "UnimplementedError",
    "functional",
]
