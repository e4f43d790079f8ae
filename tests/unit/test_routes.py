"""The ingress's routes that need no model, in process: health (Serve's proxy path too, which KubeRay
probes), the playground's files and their content policy, and the error shape of unknown routes."""

from types import SimpleNamespace

from starlette.testclient import TestClient

from raylm.config import ServeConfig
from raylm.serve.edge.routes import build_api

# These routes read only the ingress's config; the client calls it by a loopback name, as a browser would.
client = TestClient(build_api(SimpleNamespace(config=ServeConfig())), base_url="http://127.0.0.1:8000")


def test_health_answers_on_raylms_path_and_serves_proxy_path():
    for path in ("/health", "/-/healthz"):
        r = client.get(path)
        assert (r.status_code, r.json()) == (200, {"status": "ok"})


def test_the_playground_and_its_files_carry_the_content_policy():
    for path in ("/", "/playground/playground.js", "/playground/vendor/purify.min.js"):
        r = client.get(path)
        policy = r.headers["content-security-policy"]
        assert r.status_code == 200 and "script-src 'self'" in policy, path
        assert all(d in policy for d in ("form-action 'none'", "frame-ancestors 'none'", "base-uri 'none'"))
        assert (r.headers["x-content-type-options"], r.headers["x-frame-options"]) == ("nosniff", "DENY")
    assert client.get("/playground/playground.js").headers["content-type"].startswith("text/javascript")


def test_nothing_outside_the_playground_folder_is_served():
    for path in ("/playground/../ingress.py", "/playground/%2e%2e/ingress.py", "/playground/nope.js"):
        r = client.get(path)
        assert r.status_code == 404 and r.json()["error"]["code"] == "unknown_route", path
