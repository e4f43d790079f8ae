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
    assert errors.OverloadedError("busy", retry_after=2.4).headers() == {"Retry-After": "2", "retry-after-ms": "2400"}
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


ENGINE_CORE_FAILED = """Traceback (most recent call last):
  File "/venv/vllm/v1/engine/core.py", line 1100, in run_engine_core
    raise ValueError(
ValueError: Available memory on node 0 (14.77/16.71 GiB) on startup is less than desired CPU memory utilization
Process EngineCore_DP0:
RuntimeError: Engine core initialization failed. See root cause above. Failed core proc(s): {'EngineCore': 1}
"""


def test_the_engine_cores_root_cause_is_read_back_from_the_stderr_it_shares(tmp_path):
    from raylm.engine.vllm import engine_core_cause

    stderr = tmp_path / "worker.err"  # a Ray worker's stderr is its log file
    stderr.write_text("ValueError: a start before this one\n")
    since = stderr.stat().st_size
    with stderr.open("a") as f:
        f.write(ENGINE_CORE_FAILED)
    assert engine_core_cause(since, str(stderr)) == (
        "ValueError: Available memory on node 0 (14.77/16.71 GiB) on startup is less than desired CPU memory "
        "utilization")
    assert engine_core_cause(stderr.stat().st_size, str(stderr)) is None  # nothing new since
    assert engine_core_cause(0, "/dev/null") is None  # not a file: nothing read


def test_a_failed_replicas_traceback_is_told_in_one_line():
    from raylm.serve.control.service import _headline

    serve_says = ("A replica failed to start with exception. Retrying 2 more time(s). Error: \n"
                  "ray::ServeReplica:raylm:model-a.initialize_and_get_metadata() (pid=1)\n"
                  f"RuntimeError: {ENGINE_CORE_FAILED}"
                  "RuntimeError: the engine of a did not start: ValueError: Available memory on node 0\n")
    assert _headline(serve_says) == ("A replica failed to start with exception. Retrying 2 more time(s). "
                                     "Error: … RuntimeError: the engine of a did not start: ValueError: "
                                     "Available memory on node 0")
    assert _headline("Deploying: waiting for resources") == "Deploying: waiting for resources"


def test_deployments_are_described_from_serves_state_and_not_at_all_without_the_app(monkeypatch):
    from raylm import _ray
    from raylm.serve.control import service

    state = _ray.AppState("DEPLOY_FAILED", "", {
        "a": _ray.DeploymentState("UNHEALTHY", "A replica failed to start", {"STARTING": 1}),
        "ingress": _ray.DeploymentState("HEALTHY", "", {"RUNNING": 1})})
    monkeypatch.setattr(_ray, "serve_app", lambda name: state)
    assert service._describe_deployments() == "a: A replica failed to start"
    monkeypatch.setattr(_ray, "serve_app", lambda name: None)  # the app is gone (or not there yet)
    assert service._describe_deployments() == ""
