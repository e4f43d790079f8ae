"""Browser-facing checks at the edge, in process: Host allow-list, Origin, JSON content type, auth fails closed."""

import pytest
from fastapi import FastAPI, Request
from starlette.testclient import TestClient

from raylm import errors
from raylm.config import ServeConfig
from raylm.serve.edge import http
from raylm.serve.edge.access import ANONYMOUS, load_access
from raylm.serve.edge.policy import BrowserPolicy, host_allow_list, host_allowed


def _client(allowed_hosts, allowed_origins=()) -> TestClient:
    app = FastAPI()

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> dict:
        try:
            return await http.json_body(request, 2**20, 5)
        except errors.APIError as exc:
            return http.error_response(exc, "r")

    app.add_middleware(BrowserPolicy, allowed_hosts=allowed_hosts, allowed_origins=allowed_origins)
    return TestClient(app, base_url="http://127.0.0.1:8000")


LOOPBACK = host_allow_list("127.0.0.1", True, None)


@pytest.mark.parametrize("host,ok", [("127.0.0.1:8000", True), ("localhost:8000", True), ("[::1]:8000", True),
                                     ("attacker.example:8000", False), ("127.0.0.1.nip.io", False), ("", False)])
def test_a_loopback_service_answers_only_to_loopback_names(host, ok):
    assert host_allowed(host, LOOPBACK) is ok


def test_dns_rebinding_is_refused_on_every_route():
    r = _client(LOOPBACK).post("/v1/chat/completions", json={"a": 1}, headers={"host": "attacker.example:8000"})
    assert (r.status_code, r.json()["error"]["code"]) == (400, "host_not_allowed")


def test_a_public_bind_takes_any_host_unless_told_and_wildcards_match_subdomains():
    assert host_allow_list("0.0.0.0", False, None) == ("*",)
    listed = host_allow_list("0.0.0.0", False, ["*.example.com", "api.internal"])
    assert host_allowed("a.example.com:443", listed) and host_allowed("api.internal", listed)
    assert not host_allowed("example.com.evil", listed)


def test_a_web_page_cannot_post_text_plain_json():
    r = _client(LOOPBACK).post("/v1/chat/completions", content=b'{"model": "m"}',
                               headers={"content-type": "text/plain"})
    assert (r.status_code, r.json()["error"]["code"]) == (415, "unsupported_media_type")


@pytest.mark.parametrize("origin,status", [("http://127.0.0.1:8000", 200), ("https://evil.example", 403),
                                           ("null", 403), ("https://app.example", 200)])
def test_only_the_servers_own_origin_and_listed_ones_reach_the_api(origin, status):
    r = _client(LOOPBACK, ("https://app.example",)).post("/v1/chat/completions", json={"a": 1},
                                                          headers={"origin": origin})
    assert r.status_code == status
    if status == 403:
        assert r.json()["error"]["code"] == "origin_not_allowed"


def test_clients_that_are_not_browsers_send_no_origin_and_pass():
    assert _client(LOOPBACK).post("/v1/chat/completions", json={"a": 1}).json() == {"a": 1}


def test_an_empty_keys_file_is_a_start_up_error_not_an_open_service(tmp_path):
    keys = tmp_path / "keys.txt"
    keys.write_text("# nothing here yet\n\n")
    with pytest.raises(ValueError, match="holds no API key"):
        load_access(ServeConfig(api_keys_file=keys))


def test_a_public_bind_without_keys_refuses_to_start_unless_anonymous_is_asked_for():
    with pytest.raises(ValueError, match="allow_anonymous"):
        ServeConfig(host="0.0.0.0")
    assert ServeConfig(host="0.0.0.0", allow_anonymous=True).host == "0.0.0.0"
    assert ServeConfig(host="0.0.0.0", api_keys=[{"tenant": "a", "key": "k"}]).host == "0.0.0.0"
    assert ServeConfig(host="::1").loopback and ServeConfig(host="localhost").loopback


def test_without_keys_the_tenant_header_picks_a_queue_never_an_owner():
    loopback = load_access(ServeConfig())
    caller = loopback.caller({"x-raylm-tenant": "team-a"})
    assert (caller.tenant.name, caller.owner, caller.admin) == ("team-a", ANONYMOUS, True)
    public = load_access(ServeConfig(host="0.0.0.0", allow_anonymous=True)).caller({})
    assert (public.owner, public.admin) == (ANONYMOUS, False)


def test_with_keys_a_key_names_the_owner_and_admins_are_listed():
    access = load_access(ServeConfig(api_keys=[{"tenant": "ops", "key": "sk-1"}, {"tenant": "web", "key": "sk-2"}],
                                     admin_tenants=["ops"]))
    ops, web = (access.caller({"authorization": f"Bearer {k}"}) for k in ("sk-1", "sk-2"))
    assert (ops.owner, ops.admin, web.owner, web.admin) == ("ops", True, "web", False)
    with pytest.raises(ValueError, match="tenant name"):
        load_access(ServeConfig(api_keys=[{"tenant": ANONYMOUS, "key": "sk-3"}]))
