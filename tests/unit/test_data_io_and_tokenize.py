import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raylm.data import io
from raylm.data.llm_stages import Tokenize


def test_list_inputs_file_dir_glob(tmp_path):
    for name in ("a.jsonl", "b.txt", "c.parquet", "notes.md", "_hidden.jsonl"):
        (tmp_path / name).write_text("")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "d.jsonl").write_text("")
    names = lambda paths: sorted(p.rsplit("/", 1)[-1] for p in paths)  # noqa: E731
    assert names(io.list_inputs(str(tmp_path))) == ["a.jsonl", "b.txt", "c.parquet", "d.jsonl"]
    assert names(io.list_inputs(str(tmp_path / "*.jsonl"))) == ["_hidden.jsonl", "a.jsonl"]
    assert names(io.list_inputs(str(tmp_path / "b.txt"))) == ["b.txt"]
    with pytest.raises(FileNotFoundError):
        io.list_inputs(str(tmp_path / "missing"))


def test_read_file_gives_ids_and_marks_bad_lines(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text("\n".join([json.dumps({"text": "ok"}), "nope", json.dumps({"text": ["a"]})]) + "\n")
    rows = io.read_file(str(path), "text").to_pylist()
    assert [r["_row"] for r in rows] == [0, 1, 2]
    assert rows[0]["error"] is None and rows[0]["text"] == "ok"
    assert "bad JSON" in rows[1]["error"] and "not a string" in rows[2]["error"]
    pq.write_table(pa.table({"text": ["p"]}), tmp_path / "y.parquet")
    assert io.read_file(str(tmp_path / "y.parquet"), "text").to_pylist()[0]["_source"].endswith("y.parquet")


def test_one_bad_line_keeps_every_other_columns_type(tmp_path):
    path = tmp_path / "typed.jsonl"
    lines = [json.dumps({"id": i, "text": f"t{i}", "score": i / 2, "tags": ["a"]}) for i in range(4)]
    lines.insert(2, "{broken")
    path.write_text("\n".join(lines) + "\n")
    table = io.read_file(str(path), "text")
    assert table.schema.field("id").type == pa.int64() and table.schema.field("tags").type == pa.list_(pa.string())
    rows = table.to_pylist()
    assert [r["id"] for r in rows] == [0, 1, None, 2, 3] and rows[3]["score"] == 1.0
    assert [r["error"] is None for r in rows] == [True, True, False, True, True]


def test_atomic_jsonl_write(tmp_path):
    io.write_table(pa.table({"a": [1, 2]}), str(tmp_path / "o.jsonl"), "jsonl")
    assert [json.loads(line) for line in (tmp_path / "o.jsonl").read_text().splitlines()] == [{"a": 1}, {"a": 2}]
    assert not list(tmp_path.glob("*.tmp"))


def test_tokenize_stage_on_a_plain_table(tiny_model):
    stage = Tokenize(str(tiny_model))
    batch = pa.table({"text": ["hello world", None, "Ray"], "error": [None, None, "upstream"]})
    out = stage(batch).to_pylist()
    assert out[0]["input_ids"] == stage.tokenizer("hello world", add_special_tokens=False)["input_ids"]
    assert out[0]["num_tokens"] == len(out[0]["input_ids"]) > 0 and out[0]["error"] is None
    assert out[1]["error"] == "text is missing" and out[2]["error"] == "upstream"


def test_tokenize_stage_chunks_and_keeps_failed_rows(tiny_model):
    stage = Tokenize(str(tiny_model), chunk_size=2)
    out = stage(pa.table({"text": ["the quick brown fox jumps", None]})).to_pylist()
    windows = [r["input_ids"] for r in out if r["error"] is None]
    assert all(len(w) <= 2 for w in windows) and sum(len(w) for w in windows) > 2
    assert [r["chunk"] for r in out if r["error"] is None] == list(range(len(windows)))
    assert sum(1 for r in out if r["error"]) == 1


def test_an_engine_stage_runs_every_batch_on_the_thread_that_made_its_engine(monkeypatch):
    """OpenMP keeps a thread team per calling thread: the engine must run where vLLM bound its team."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from raylm.data import llm_stages

    monkeypatch.setattr(llm_stages, "_make_llm", lambda *a, **k: threading.get_ident())

    class Stage(llm_stages._EngineStage):
        def map(self, batch):
            return threading.get_ident()

    stage = Stage("model", {})
    with ThreadPoolExecutor(1) as caller:  # as Ray Data calls a stage: from a thread of its own
        ran_on = caller.submit(stage, pa.table({"text": ["a"]})).result()
    assert ran_on == stage.llm != threading.get_ident()
