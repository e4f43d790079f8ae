"""`raylm build` → `serve deploy` on a Ray head started by `ray start` (the path to any Ray cluster, KubeRay's
serveConfigV2 included): the app comes up from the file alone and answers."""

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest
import yaml

from helpers import CPU_ENV, TINY_ENGINE_ARGS, free_port

from raylm.serve.control.service import end_processes

BIN = Path(sys.executable).parent


@pytest.mark.slow  # ~80 s (a second Ray cluster with its dashboard): `make test-slow`, run before resolving
def test_raylm_build_output_deploys_with_serve_deploy(tiny_model, tmp_path):
    port, dashboard = free_port(), free_port()
    config = tmp_path / "raylm.yaml"
    config.write_text(yaml.safe_dump({
        "models": [{"name": "tiny", "source": str(tiny_model), "num_cpus": 0.5, "engine_args": TINY_ENGINE_ARGS,
                    "env": CPU_ENV}],
        "serve": {"port": port}}))
    built = subprocess.run([str(BIN / "raylm"), "build", str(config), "-o", str(tmp_path / "serve.yaml")],
                           capture_output=True, text=True, timeout=120)
    assert built.returncode == 0, built.stderr
    temp_dir = Path("/tmp") / f"raylm-deploy-{os.getpid()}"
    # serve deploy talks to the dashboard's REST API, so this head has one (on loopback).
    subprocess.run([str(BIN / "ray"), "start", "--head", f"--port={free_port()}", "--node-ip-address=127.0.0.1",
                    "--num-cpus=2", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
                    f"--dashboard-port={dashboard}", f"--temp-dir={temp_dir}", "--disable-usage-stats"],
                   check=True, timeout=180, capture_output=True)
    # `ray start` turned token auth on (Ray 2.60's default) and wrote ~/.ray/auth_token; the CLI reads it so.
    env = {**os.environ, "RAY_AUTH_MODE": "token"}
    try:
        deployed = subprocess.run([str(BIN / "serve"), "deploy", str(tmp_path / "serve.yaml"),
                                   "-a", f"http://127.0.0.1:{dashboard}"], capture_output=True, text=True,
                                  timeout=120, env=env)
        assert deployed.returncode == 0, deployed.stdout + deployed.stderr
        deadline, ready = time.monotonic() + 240, None
        while time.monotonic() < deadline:
            try:
                ready = httpx.get(f"http://127.0.0.1:{port}/ready", timeout=10)
                if ready.status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(2)
        assert ready is not None and ready.status_code == 200, ready and ready.text
        r = httpx.post(f"http://127.0.0.1:{port}/v1/completions", timeout=60,
                       json={"model": "tiny", "prompt": "Hello", "max_tokens": 4})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4, r.text
    finally:
        subprocess.run([str(BIN / "serve"), "shutdown", "-y", "-a", f"http://127.0.0.1:{dashboard}"],
                       capture_output=True, timeout=120, env=env)
        ours = [p for p in psutil.process_iter(["cmdline"])
                if str(temp_dir) in " ".join(p.info["cmdline"] or [])]
        end_processes(ours, grace_s=0, term_s=5)
