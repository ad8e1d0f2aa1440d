import pickle

import pytest

from models import errors as E
from models.errors import PayloadTooLarge, Unauthorized, UnsupportedMediaType
from serve.errors import ERROR_TABLE, as_service_error, error_body


@pytest.mark.parametrize(
    "err, status, code",
    [
        (E.InvalidRequest("x"), 400, "invalid_request"),
        (E.InputTooLong("x"), 400, "input_too_long"),
        (E.TooManyInputs("x"), 400, "too_many_inputs"),
        (E.ModelNotFound("x"), 404, "model_not_found"),
        (E.VariantNotFound("x"), 404, "variant_not_found"),
        (E.AdapterNotFound("x"), 404, "adapter_not_found"),
        (Unauthorized("x"), 401, "invalid_api_key"),
        (PayloadTooLarge("x"), 413, "payload_too_large"),
        (UnsupportedMediaType("x"), 415, "unsupported_media_type"),
        (E.InferenceTimeout("x"), 408, "timeout"),
        (E.Overloaded("x"), 503, "overloaded"),
        (E.ServiceError("secret detail"), 500, "internal_error"),
        (E.Forbidden("x"), 403, "forbidden"),
        (E.MethodNotAllowed("x"), 405, "method_not_allowed"),
        (E.Conflict("x"), 409, "conflict"),
        (E.InvalidAdapter("x"), 400, "invalid_adapter"),
        (E.TaskNotSupported("x"), 400, "task_not_supported"),
        (E.AdapterLoadFailed("x"), 503, "adapter_load_failed"),
        (E.VariantUnavailable("x"), 503, "variant_unavailable"),
        (E.NotReady("x"), 503, "not_ready"),
        (E.ModelLoadError("x"), 503, "model_load_failed"),
    ],
)
def test_table_maps_status_code_and_envelope(err, status, code):
    got_status, body, headers = error_body(err, "rid")
    assert got_status == status
    assert body["error"]["code"] == code and body["request_id"] == "rid"
    assert set(body["error"]) == {"message", "type", "param", "code"}
    if status == 500:
        assert body["error"]["message"] == "internal error"
    if status == 503:
        assert headers["Retry-After"] == "1"


def test_unknown_exceptions_become_internal_without_details():
    err = as_service_error(KeyError("traceback material"))
    status, body, _ = error_body(err, "r")
    assert status == 500 and "traceback" not in body["error"]["message"]


def test_errors_survive_pickling_across_a_ray_hop():
    err = pickle.loads(pickle.dumps(E.InputTooLong("too long", param="input")))
    assert isinstance(err, E.InputTooLong) and err.param == "input" and err.code == "input_too_long"


def test_table_ends_with_the_catch_all():
    assert ERROR_TABLE[-1][0] is E.ServiceError


def _all_subclasses(cls):
    for sub in cls.__subclasses__():
        yield sub
        yield from _all_subclasses(sub)


@pytest.mark.parametrize("cls", sorted(set(_all_subclasses(E.ServiceError)), key=lambda c: c.__name__))
def test_every_error_class_has_its_own_code_and_a_non_500_status(cls):
    """Every class of the hierarchy is something the service reports on purpose: it maps to a
    4xx/503/408, never to the catch-all 500, and its code is stable and its own."""
    status, body, _ = error_body(cls("x"), "r")
    assert status != 500, cls
    assert body["error"]["code"] == cls.code != E.ServiceError.code
    assert [c for c in _all_subclasses(E.ServiceError) if c.code == cls.code] == [cls]
