"""Typed domain errors of the model layer.

One hierarchy for the whole service (the model layer raises most of them; the ingress raises
the request-level ones at the bottom). They know nothing of HTTP: ``serve.errors`` holds the one
table that maps each class to a status code and the OpenAI error envelope. Every error carries a stable string ``code`` (part of
the public contract) and optionally the request ``param`` it is about. Messages name the
offending value and the limit it broke.
"""

from __future__ import annotations


class ServiceError(Exception):
    """Base of every error the service reports on purpose."""

    code = "internal_error"

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code

    def __reduce__(self):  # keep code/param when pickled across a Ray hop
        return (_rebuild, (type(self), self.message, self.param, self.code))


def _rebuild(cls, message, param, code):
    return cls(message, param=param, code=code)


class InvalidRequest(ServiceError):
    """The request is well-formed JSON but asks for something invalid."""

    code = "invalid_request"


class InvalidAdapter(InvalidRequest):
    """An adapter's files, config or weights are refused (``models.adapters``)."""

    code = "invalid_adapter"


class InputTooLong(InvalidRequest):
    code = "input_too_long"


class TooManyInputs(InvalidRequest):
    code = "too_many_inputs"


class TaskNotSupported(InvalidRequest):
    """The model exists but does not serve this route's task (e.g. classify on an embedder)."""

    code = "task_not_supported"


class NotFound(ServiceError):
    code = "not_found"


class ModelNotFound(NotFound):
    code = "model_not_found"


class AdapterNotFound(NotFound):
    code = "adapter_not_found"


class VariantNotFound(NotFound):
    code = "variant_not_found"


class Conflict(ServiceError):
    """A name is taken (an adapter name registered already, or a base model's name)."""

    code = "conflict"


class Overloaded(ServiceError):
    """The replica's queue is full: fail fast instead of queueing without bound."""

    code = "overloaded"

    def __init__(self, message: str, *, retry_after_s: int = 1, **kw):
        super().__init__(message, **kw)
        self.retry_after_s = retry_after_s


class NotReady(ServiceError):
    code = "not_ready"


class VariantUnavailable(NotReady):
    """The variant exists in the config but does not serve: its files failed to load or it
    failed the parity gate (the message says which; ``GET /v1/models`` shows it too)."""

    code = "variant_unavailable"

    def __init__(self, message: str, *, parity: dict | None = None, **kw):
        super().__init__(message, **kw)
        self.parity = parity  # the gate's result, when parity is why


class InferenceTimeout(ServiceError):
    code = "timeout"


class ModelLoadError(ServiceError):
    """A model (or variant) could not be loaded from its source."""

    code = "model_load_failed"


class AdapterLoadFailed(ModelLoadError):
    """A registered adapter could not be loaded in this replica (files changed or broken)."""

    code = "adapter_load_failed"


# -- request-level errors, raised by the ingress before a model is involved ------------------
class Unauthorized(ServiceError):
    code = "invalid_api_key"


class Forbidden(ServiceError):
    code = "forbidden"


class PayloadTooLarge(ServiceError):
    code = "payload_too_large"


class UnsupportedMediaType(ServiceError):
    code = "unsupported_media_type"


class MethodNotAllowed(ServiceError):
    code = "method_not_allowed"
