"""`raylm serve` as a user runs it: a subprocess, on a local cluster or joining one, stopped by Ctrl-C."""

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import psutil
import pytest
import yaml

from helpers import CPU_ENV, TINY_ENGINE_ARGS, free_port

from raylm.serve.control.service import end_processes

RAYLM = [sys.executable, "-m", "raylm.cli"]


def write_config(path: Path, model: Path, port: int) -> Path:
    path.write_text(yaml.safe_dump({
        "models": [{"name": "tiny", "source": str(model), "num_cpus": 0.5, "engine_args": TINY_ENGINE_ARGS, "env": CPU_ENV}],
        "serve": {"port": port, "metrics_port": free_port()},
    }))
    return path


def start_serve(*args: str) -> subprocess.Popen:
    return subprocess.Popen([*RAYLM, "serve", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def wait_for_url(proc: subprocess.Popen, url: str, timeout_s: float = 300) -> list[str]:
    """raylm prints the API URL on stdout once every model is ready; returns what the console showed
    (stderr) until then."""
    lines: list[str] = []
    console: list[str] = []
    for stream, into in ((proc.stdout, lines), (proc.stderr, console)):
        threading.Thread(target=lambda s=stream, i=into: i.extend(iter(s.readline, "")), daemon=True).start()
    proc.lines = lines  # stdout, read on until the process ends
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and f"{url}/v1\n" not in lines:
        assert proc.poll() is None, f"raylm serve exited with {proc.returncode}"
        time.sleep(0.5)
    assert f"{url}/v1\n" in lines, f"no URL printed after {timeout_s}s: {lines[-5:]}"
    assert httpx.get(f"{url}/ready", timeout=10).status_code == 200
    while "raylm is ready" not in "".join(console) and time.monotonic() < deadline:  # printed just before the URL
        time.sleep(0.1)
    return console


def interrupt(proc: subprocess.Popen, timeout_s: float = 90, sig: int = signal.SIGINT) -> None:
    proc.send_signal(sig)
    proc.wait(timeout=timeout_s)


def _name(proc: psutil.Process) -> str:
    try:
        return " ".join(proc.cmdline())[:80]
    except psutil.Error:
        return "?"


def complete(url: str) -> dict:
    r = httpx.post(f"{url}/v1/completions", json={"model": "tiny", "prompt": "Hello", "max_tokens": 4},
                   timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def test_serve_config_file_then_sigterm_leaves_nothing(tiny_model, tmp_path):
    """SIGTERM, as a service manager stops it: every process it started is gone, Ray's agents included (Ray's
    own C handler used to kill the process before it could stop them; Ctrl-C is the joining tests')."""
    port = free_port()
    config = write_config(tmp_path / "raylm.yaml", tiny_model, port=1)  # --port overrides the file
    proc = start_serve(str(config), "--port", str(port))
    url = f"http://127.0.0.1:{port}"
    try:
        console = wait_for_url(proc, url)
        # A quiet console: each phase with its seconds, then one table; Ray's and vLLM's lines go to the logs.
        text = "".join(console)
        assert "tiny: loading weights" in text and "tiny: ready" in text, text
        assert all(row in text for row in ("playground", f"{url}/", "metrics", "logs")), text
        assert len(console) <= 20 and " INFO " not in text and "EngineCore" not in text, text
        ps = psutil.Process(proc.pid)
        descendants = ps.children(recursive=True)
        assert any("EngineCore" in " ".join(p.cmdline()) or p.name() == "VLLM::EngineCore"
                   for p in descendants if p.is_running())
        assert complete(url)["usage"]["completion_tokens"] == 4
        status = subprocess.run([*RAYLM, "status", "--url", url], capture_output=True, text=True, timeout=60)
        assert status.returncode == 0 and "tiny" in status.stdout and "1 running" in status.stdout, status
        descendants = ps.children(recursive=True)  # Ray's agents and every worker, as they are now
        interrupt(proc, sig=signal.SIGTERM)
        assert proc.returncode == 0
        _, alive = psutil.wait_procs(descendants, timeout=5)  # at most moments after raylm serve itself
        assert not alive, [(p.pid, _name(p)) for p in alive]
        time.sleep(0.5)  # the reader threads take the last lines
        # Quiet to the end: not Ray's "Task ServeController.… failed" as Serve's controller ends itself.
        after = "".join(proc.lines) + "".join(console)
        assert "ServeController" not in after and "retries remaining" not in after, after[-2000:]
    finally:
        if proc.poll() is None:
            proc.kill()


@pytest.fixture(scope="module")
def ray_head():
    """A Ray head started by `ray start` on loopback; ended afterwards by PID, nothing else touched."""
    port = free_port()
    temp_dir = Path("/tmp") / f"raylm-head-{os.getpid()}"
    ray_bin = Path(sys.executable).with_name("ray")
    subprocess.run([str(ray_bin), "start", "--head", f"--port={port}", "--node-ip-address=127.0.0.1",
                    "--num-cpus=2", "--include-dashboard=false", f"--temp-dir={temp_dir}",
                    "--disable-usage-stats"], check=True, timeout=120)
    yield port
    ours = [p for p in psutil.process_iter(["cmdline"]) if str(temp_dir) in " ".join(p.info["cmdline"] or [])]
    end_processes(ours, grace_s=0, term_s=5)


# host:port in `make test` (the path that needs the token door); `auto` (~65 s more) in `make test-slow`.
@pytest.mark.parametrize("how", [pytest.param("auto", marks=pytest.mark.slow), "host:port"])
def test_serve_joins_an_existing_cluster(ray_head, tiny_model, tmp_path, how):
    port = free_port()
    config = write_config(tmp_path / "raylm.yaml", tiny_model, port)
    proc = start_serve(str(config), "--address", "auto" if how == "auto" else f"127.0.0.1:{ray_head}")
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_url(proc, url)
        assert complete(url)["model"] == "tiny"
        raylets = [p for p in psutil.process_iter(["name"]) if p.info["name"] == "raylet"]
        interrupt(proc)
        assert proc.returncode == 0
        # The cluster was there before us and stays; our app and the Serve we started are gone.
        assert all(p.is_running() for p in raylets)
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"{url}/health", timeout=5)
    finally:
        if proc.poll() is None:
            proc.kill()


@pytest.mark.slow  # ~55 s (a Ray cluster started to fail in the engine): `make test-slow`
def test_bad_engine_argument_fails_with_the_reason(tiny_model, tmp_path):
    config = write_config(tmp_path / "raylm.yaml", tiny_model, free_port())
    data = yaml.safe_load(config.read_text())
    data["models"][0]["engine_args"] = {"max_modle_len": 64}
    config.write_text(yaml.safe_dump(data))
    proc = subprocess.run([*RAYLM, "serve", str(config)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    assert "unknown vLLM engine argument 'max_modle_len'" in proc.stdout + proc.stderr


def test_an_impossible_config_fails_fast_with_the_reason(tmp_path):
    """The issue's case: the default two models, 2 replicas each, on 2 cores: 3.1 CPUs asked of 2."""
    config = tmp_path / "raylm.yaml"
    config.write_text(yaml.safe_dump({"serve": {"port": free_port(), "metrics_port": free_port(), "num_cpus": 2}}))
    start = time.monotonic()
    proc = subprocess.run([*RAYLM, "serve", str(config), "--replicas", "2"], capture_output=True, text=True,
                          timeout=300)
    took = time.monotonic() - start
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out[-2000:]
    assert "needs 3.1 CPUs at start, the cluster has 2" in out and "smollm2-135m-instruct: 2 ×" in out
    assert took < 60  # before: a silent wait for ready_timeout_s (600 s)
