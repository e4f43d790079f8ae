import pytest
from pydantic import BaseModel

from raylm import errors


def test_every_error_has_the_openai_body_with_a_string_code():
    for cls in (errors.InvalidRequestError, errors.AuthenticationError, errors.NotFoundError,
                errors.OverloadedError, errors.UnavailableError, errors.InternalError):
        body = cls("boom", param="p").body()
        assert set(body["error"]) == {"message", "type", "param", "code"}
        assert isinstance(body["error"]["code"], str)


def test_retry_after_header_only_when_given():
    assert errors.OverloadedError("busy", retry_after=2.4).headers() == {"Retry-After": "2"}
    assert errors.OverloadedError("busy").headers() == {}


@pytest.mark.parametrize(("status", "cls", "code"), [
    (400, errors.InvalidRequestError, "invalid_value"),
    (404, errors.NotFoundError, "not_found"),
    (503, errors.UnavailableError, "service_unavailable"),
    (500, errors.InternalError, "internal_error"),
    (502, errors.InternalError, "internal_error"),
])
def test_from_status_maps_engine_errors(status, cls, code):
    err = errors.from_status(status, "m", "p")
    assert type(err) is cls
    assert err.status == (500 if status == 502 else status)
    assert err.code == code


def test_unknown_4xx_stays_4xx_and_context_length_gets_openais_code():
    assert errors.from_status(422, "bad").status == 422
    err = errors.from_status(400, "This model's maximum context length is 256 tokens")
    assert err.code == "context_length_exceeded"


def test_validation_error_names_the_field():
    class Req(BaseModel):
        temperature: float
        n: int = 1

    with pytest.raises(ValueError) as info:
        Req.model_validate({"temperature": "hot", "n": "x"})
    err = errors.validation_error(info.value)
    assert err.param == "temperature"
    assert err.status == 400 and "1 more" in err.message
