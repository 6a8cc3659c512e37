"""Client of the mnist-serving gRPC API: library (sync and asyncio), CLI, batch scoring.

    from mnist_serving.client import MnistClient

    with MnistClient("localhost:8500") as client:
        prediction = client.predict(images)  # uint8 [N, 28, 28]
        prediction.classes, prediction.probabilities, prediction.model_version

No TensorFlow here: the base install is grpcio, protobuf, numpy and tqdm (Pillow for images).
"""

from .aio import AsyncMnistClient
from .client import (
    NO_RETRY,
    PRIORITIES,
    SERVICE_NAME,
    Keepalive,
    MnistClient,
    Priority,
    RetryPolicy,
    tls_credentials,
)
from .codec import Prediction
from .errors import (
    DeadlineExceeded,
    InvalidInput,
    MnistError,
    NotFound,
    Overloaded,
    PermissionDenied,
    ProtocolError,
    RateLimited,
    Unauthenticated,
    Unavailable,
)
from .feedback import MAX_FEEDBACK_LABELS, FeedbackLabel, FeedbackResult
from .metadata import ModelMetadata, TensorSpec, VersionInfo

__all__ = [
    "MAX_FEEDBACK_LABELS",
    "NO_RETRY",
    "PRIORITIES",
    "SERVICE_NAME",
    "AsyncMnistClient",
    "DeadlineExceeded",
    "FeedbackLabel",
    "FeedbackResult",
    "InvalidInput",
    "Keepalive",
    "MnistClient",
    "MnistError",
    "ModelMetadata",
    "NotFound",
    "Overloaded",
    "PermissionDenied",
    "Prediction",
    "Priority",
    "ProtocolError",
    "RateLimited",
    "RetryPolicy",
    "TensorSpec",
    "Unauthenticated",
    "Unavailable",
    "VersionInfo",
    "tls_credentials",
]
