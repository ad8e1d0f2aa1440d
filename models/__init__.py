"""Ray-free model layer: specs, the Backend seam and its implementations, tiny test models."""

from models.backend import Backend, create_backend
from models.errors import (
    AdapterNotFound,
    InferenceTimeout,
    InputTooLong,
    InvalidRequest,
    ModelLoadError,
    ModelNotFound,
    NotFound,
    NotReady,
    Overloaded,
    ServiceError,
    TaskNotSupported,
    TooManyInputs,
    VariantNotFound,
)
from models.postprocess import shorten_embeddings
from models.spec import AdapterPolicy, BatchingSpec, ModelSpec, Task, VariantName
from models.target import Target

__all__ = [
    "AdapterNotFound",
    "AdapterPolicy",
    "Backend",
    "BatchingSpec",
    "InferenceTimeout",
    "InputTooLong",
    "InvalidRequest",
    "ModelLoadError",
    "ModelNotFound",
    "ModelSpec",
    "NotFound",
    "NotReady",
    "Overloaded",
    "ServiceError",
    "Target",
    "Task",
    "TaskNotSupported",
    "TooManyInputs",
    "VariantName",
    "VariantNotFound",
    "create_backend",
    "shorten_embeddings",
]
