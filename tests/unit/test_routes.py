"""The ingress's routes that need no model, in process: health (Serve's proxy path too, which KubeRay
probes), the playground's files and their content policy, and the error shape of unknown routes."""

from starlette.testclient import TestClient

from raylm.serve.edge.routes import build_api

client = TestClient(build_api(None))  # these routes never reach the ingress object


def test_health_answers_on_raylms_path_and_serves_proxy_path():
    for path in ("/health", "/-/healthz"):
        r = client.get(path)
        assert (r.status_code, r.json()) == (200, {"status": "ok"})


def test_the_playground_and_its_files_carry_the_content_policy():
    for path in ("/", "/playground/playground.js", "/playground/vendor/purify.min.js"):
        r = client.get(path)
        assert r.status_code == 200 and "script-src 'self'" in r.headers["content-security-policy"], path
        assert r.headers["x-content-type-options"] == "nosniff"
    assert client.get("/playground/playground.js").headers["content-type"].startswith("text/javascript")


def test_nothing_outside_the_playground_folder_is_served():
    for path in ("/playground/../ingress.py", "/playground/%2e%2e/ingress.py", "/playground/nope.js"):
        r = client.get(path)
        assert r.status_code == 404 and r.json()["error"]["code"] == "unknown_route", path
