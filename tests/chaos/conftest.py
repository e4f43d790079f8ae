import pytest

from scenario import chaos_config


@pytest.fixture(scope="module")
def chaos_service(tiny_model):
    from raylm.serve.runner import start

    svc = start(chaos_config(tiny_model))
    yield svc
    svc.stop()
