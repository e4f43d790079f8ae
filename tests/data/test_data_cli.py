"""`raylm data` as users run it: real Ray Data, real tokenizer, real vLLM embedding and generation."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

RAYLM = [sys.executable, "-m", "raylm.cli", "data"]


def raylm_data(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([*RAYLM, *args], capture_output=True, text=True, timeout=timeout)


def counts(proc: subprocess.CompletedProcess) -> list[int]:
    """The last stdout line: rows in, out, failed, already done."""
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [int(x) for x in proc.stdout.strip().splitlines()[-1].split()]


def read_out(out: Path, sub: str) -> pa.Table:
    files = sorted((out / sub).glob("*.parquet"))
    return pa.concat_tables([pq.read_table(f) for f in files], promote_options="permissive") if files else None


@pytest.fixture
def mixed_input(tmp_path) -> Path:
    folder = tmp_path / "in"
    folder.mkdir()
    with open(folder / "a.jsonl", "w") as f:
        for i in range(50):
            f.write(json.dumps({"text": f"hello world number {i}"}) + "\n")
        f.write(json.dumps({"text": 42}) + "\n")          # row 50: not a string
        f.write(json.dumps({"other": "no text"}) + "\n")  # row 51: missing
        f.write("{broken json\n")                          # row 52: not JSON
    (folder / "b.txt").write_bytes(b"plain line one\nbad \xff\xfe bytes\nline three\n")
    pq.write_table(pa.table({"text": ["from parquet", "again"]}), folder / "c.parquet")
    return folder


def test_tokenize_keeps_bad_rows_as_errors_and_resumes_as_done(mixed_input, tmp_path):
    out = tmp_path / "out"
    assert counts(raylm_data("tokenize", str(mixed_input), str(out))) == [58, 54, 4, 0]
    errors = read_out(out, "errors").to_pylist()
    reasons = {(Path(e["_source"]).name, e["_row"]): e["error"] for e in errors}
    assert set(reasons) == {("a.jsonl", 50), ("a.jsonl", 51), ("a.jsonl", 52), ("b.txt", 1)}
    assert "not a string" in reasons["a.jsonl", 50] and "missing" in reasons["a.jsonl", 51]
    assert "JSON" in reasons["a.jsonl", 52] and "undecodable" in reasons["b.txt", 1]
    data = read_out(out, "data")
    row = next(r for r in data.to_pylist() if r["text"] == "hello world number 7")
    from transformers import AutoTokenizer

    from raylm.models import default_cache_dir, prepare_smollm2

    tok = AutoTokenizer.from_pretrained(prepare_smollm2(default_cache_dir()))
    assert row["input_ids"] == tok("hello world number 7", add_special_tokens=False)["input_ids"]
    assert row["num_tokens"] == len(row["input_ids"])
    # The same job again: nothing is redone.
    assert counts(raylm_data("tokenize", str(mixed_input), str(out))) == [0, 0, 0, 58]


def test_chunking_into_fixed_windows(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"text": " ".join(["word"] * 25)}) + "\n")
    out = tmp_path / "out"
    assert counts(raylm_data("tokenize", str(src), str(out), "--chunk-size", "10"))[:3] == [1, 3, 0]
    rows = sorted(read_out(out, "data").to_pylist(), key=lambda r: r["chunk"])
    assert [r["num_tokens"] for r in rows] == [10, 10, 5]


def test_refuses_missing_empty_and_foreign_outputs(mixed_input, tmp_path):
    missing = raylm_data("tokenize", str(tmp_path / "nope.jsonl"), str(tmp_path / "o1"))
    assert missing.returncode == 2 and "does not exist" in missing.stderr
    (tmp_path / "empty.jsonl").write_text("")
    empty = raylm_data("tokenize", str(tmp_path / "empty.jsonl"), str(tmp_path / "o2"))
    assert empty.returncode == 2 and "no rows" in empty.stderr
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "precious.txt").write_text("keep me")
    refused = raylm_data("tokenize", str(mixed_input), str(foreign))
    assert refused.returncode == 2 and "not a raylm job output" in refused.stderr
    assert (foreign / "precious.txt").read_text() == "keep me"
    out = tmp_path / "o3"
    counts(raylm_data("tokenize", str(mixed_input), str(out)))
    other = raylm_data("tokenize", str(mixed_input), str(out), "--chunk-size", "4")
    assert other.returncode == 2 and "different job" in other.stderr


@pytest.mark.slow  # ~45 s on an AVX2-only machine: `make test-slow`
def test_resume_after_kill_9_loses_and_duplicates_nothing(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    files, rows_per_file = 40, 500
    for f in range(files):
        lines = [json.dumps({"text": f"file {f} line {i} " + "lorem ipsum " * 20}) for i in range(rows_per_file)]
        (folder / f"{f:03d}.jsonl").write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    proc = subprocess.Popen([*RAYLM, "tokenize", str(folder), str(out), "--concurrency", "1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ours = []
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and not list((out / "data").glob("*.parquet")):
        ours = psutil.Process(proc.pid).children(recursive=True) or ours
        time.sleep(0.05)
    ours = psutil.Process(proc.pid).children(recursive=True) or ours
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    for p in ours:  # the local Ray cluster that driver started: ended by PID
        try:
            p.kill()
        except psutil.Error:
            pass
    written = len(pq.read_table(out / "data", columns=["_row"])) if list((out / "data").glob("*.parquet")) else 0
    assert 0 < written < files * rows_per_file, f"kill came too late to test a resume ({written} rows)"

    rows_in, rows_out, failed, skipped = counts(raylm_data("tokenize", str(folder), str(out), "--concurrency", "1"))
    assert skipped == written and rows_in == files * rows_per_file - written and failed == 0
    ids = pq.read_table(out / "data", columns=["_source", "_row"]).to_pylist()
    assert len(ids) == files * rows_per_file
    assert len({(r["_source"], r["_row"]) for r in ids}) == files * rows_per_file
    print(f"resume: {written} rows written before kill -9, {rows_in} after, 0 lost, 0 duplicated")


def test_embed_unit_norm_vectors(mixed_input, tmp_path):
    out = tmp_path / "out"
    assert counts(raylm_data("embed", str(mixed_input), str(out))) == [58, 54, 4, 0]
    data = read_out(out, "data")
    assert data.schema.field("embedding").type == pa.list_(pa.float32(), 384)
    vectors = np.array(data["embedding"].to_pylist())
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-4)


def test_generate_on_tiny_model_with_per_row_params(tiny_model, tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text("\n".join(json.dumps(r) for r in [
        {"text": "Hello world"}, {"text": "The quick brown", "max_tokens": 3}, {"text": "word " * 600}]) + "\n")
    out = tmp_path / "out"
    result = raylm_data("generate", str(src), str(out), "--model", str(tiny_model), "--max-tokens", "8")
    assert counts(result) == [3, 2, 1, 0]
    rows = {r["_row"]: r for r in read_out(out, "data").to_pylist()}
    assert rows[1]["num_generated_tokens"] <= 3 and rows[0]["num_generated_tokens"] <= 8
    assert rows[0]["finish_reason"] in ("stop", "length") and rows[0]["num_prompt_tokens"] > 2
    error = read_out(out, "errors").to_pylist()[0]
    assert error["_row"] == 2 and "context" in error["error"]


def test_generate_rows_through_the_configs_adapters(tiny_model, lora_dir, tmp_path):
    import yaml
    from helpers import TINY_ENGINE_ARGS

    config = tmp_path / "raylm.yaml"
    config.write_text(yaml.safe_dump({"models": [{
        "name": "tiny-lora", "source": str(tiny_model), "engine_args": TINY_ENGINE_ARGS,
        "adapters": {"tiny-a": str(lora_dir / "a"), "tiny-b": str(lora_dir / "b")},
        "lora": {"max_loras": 2, "max_lora_rank": 8}}]}))
    src = tmp_path / "in.jsonl"
    rows = [{}, {"adapter": "tiny-a"}, {"adapter": "tiny-b"}, {"adapter": "nope"}, {"adapter": "tiny-a"}]
    src.write_text("\n".join(json.dumps({"text": "Hello world", "ignore_eos": True, **r}) for r in rows) + "\n")
    out = tmp_path / "out"
    result = raylm_data("generate", str(src), str(out), "--config", str(config), "--model", "tiny-lora",
                        "--max-tokens", "8")
    assert counts(result) == [5, 4, 1, 0]
    texts = {r["_row"]: r["generated_text"] for r in read_out(out, "data").to_pylist()}
    assert len({texts[0], texts[1], texts[2]}) == 3 and texts[4] == texts[1]  # base, a, b: each its own weights
    error = read_out(out, "errors").to_pylist()[0]
    assert error["_row"] == 3 and "no adapter 'nope'; this model's: tiny-a, tiny-b" in error["error"]
