"""API keys → tenants; keys are stored hashed and never echoed."""

import pytest

from raylm import errors
from raylm.config import ServeConfig
from raylm.serve.edge.access import load_access


def test_keys_from_config_and_file_name_tenants(tmp_path):
    keys = tmp_path / "keys.txt"
    keys.write_text("# tenant:key\nbatch-team: sk-file-123\n")
    config = ServeConfig(api_keys=[{"tenant": "web", "key": "sk-conf-456"}], api_keys_file=keys,
                         tenants={"web": {"weight": 4, "priority": 0}})
    access = load_access(config)
    assert "sk-conf-456" not in repr(config) and "sk-" not in repr(access)
    web = access.tenant({"authorization": "Bearer sk-conf-456"})
    assert (web.name, web.weight) == ("web", 4)
    assert access.tenant({"authorization": "bearer sk-file-123"}).name == "batch-team"


@pytest.mark.parametrize("headers,code", [({}, "missing_api_key"),
                                          ({"authorization": "Bearer sk-wrong"}, "invalid_api_key"),
                                          ({"authorization": "sk-conf-456"}, "missing_api_key")])
def test_missing_or_wrong_key_is_401(headers, code):
    access = load_access(ServeConfig(api_keys=[{"tenant": "web", "key": "sk-conf-456"}]))
    with pytest.raises(errors.AuthenticationError) as exc:
        access.tenant(headers)
    assert exc.value.status == 401 and exc.value.code == code and "sk-" not in exc.value.message


def test_without_keys_a_header_names_the_tenant():
    access = load_access(ServeConfig(tenants={"b": {"weight": 2}}))
    assert access.tenant({}).name == "default"
    assert access.tenant({"x-raylm-tenant": "b"}).weight == 2


def test_a_bad_keys_file_line_is_reported_without_its_content(tmp_path):
    keys = tmp_path / "keys.txt"
    keys.write_text("sk-secret-without-tenant\n")
    with pytest.raises(ValueError) as exc:
        load_access(ServeConfig(api_keys_file=keys))
    assert "keys.txt:1" in str(exc.value) and "sk-secret" not in str(exc.value)
