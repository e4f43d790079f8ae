"""A `raylm serve` stopped (Ctrl-C) mid-batch and started again finishes the batch: every line answered once."""

import json
import time

import pytest
import yaml
from helpers import CPU_ENV, TINY_ENGINE_ARGS, free_port
from test_cli import interrupt, start_serve, wait_for_url

LINES = 240


@pytest.mark.slow  # two service starts: ~130 s
def test_a_restarted_service_finishes_its_batch_exactly_once(tiny_model, tmp_path):
    from openai import OpenAI

    port = free_port()
    config = tmp_path / "raylm.yaml"
    config.write_text(yaml.safe_dump({
        "models": [{"name": "tiny", "source": str(tiny_model), "num_cpus": 0.5, "env": CPU_ENV,
                    "engine_args": TINY_ENGINE_ARGS, "admission": {"batch_max_running": 2}}],
        "serve": {"port": port, "metrics_port": free_port(), "batch_dir": str(tmp_path / "batches")}}))
    url = f"http://127.0.0.1:{port}"
    client = OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)
    lines = [json.dumps({"custom_id": f"line-{i}", "method": "POST", "url": "/v1/completions",
                         "body": {"model": "tiny", "prompt": f"count {i}", "max_tokens": 32, "ignore_eos": True}})
             for i in range(LINES)]
    proc = start_serve(str(config))
    try:
        wait_for_url(proc, url)
        upload = client.files.create(file=("lines.jsonl", "\n".join(lines).encode()), purpose="batch")
        batch = client.batches.create(input_file_id=upload.id, endpoint="/v1/completions", completion_window="24h")
        deadline = time.monotonic() + 120
        while (done := client.batches.retrieve(batch.id).request_counts.completed) < 32:
            assert time.monotonic() < deadline, "the batch made no progress"
            time.sleep(0.3)
        interrupt(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
    before = done
    assert before < LINES, "the batch finished before the restart: nothing to test"

    proc = start_serve(str(config))
    try:
        wait_for_url(proc, url)
        deadline = time.monotonic() + 240
        while (batch := client.batches.retrieve(batch.id)).status != "completed":
            assert batch.status in ("in_progress", "finalizing"), batch
            assert time.monotonic() < deadline, f"batch still {batch.status}: {batch.request_counts}"
            time.sleep(0.5)
        output = [json.loads(line) for line in client.files.content(batch.output_file_id).text.splitlines()]
        interrupt(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
    ids = [o["custom_id"] for o in output]
    assert sorted(ids) == sorted(f"line-{i}" for i in range(LINES))  # every line, none twice
    assert all(o["response"]["body"]["usage"]["completion_tokens"] == 32 for o in output)
    assert (batch.request_counts.total, batch.request_counts.completed, batch.error_file_id) == (LINES, LINES, None)
    print(f"\nBATCH-RESTART lines {LINES}: {before} answered before the restart, {LINES - before} after, "
          f"{len(ids)} in the output, {len(ids) - len(set(ids))} twice")
