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


def _by_blocks(path, rows_per_block):
    scanned = io.scan(str(path))
    return [row for b in scanned.blocks(rows_per_block) for row in io.read_block(b, "text").to_pylist()]


@pytest.mark.parametrize("content", [
    b'{"text": "a", "id": 1}\n\n{"text": "b", "id": 2}\r\n  \n{"text": "c", "id": 3}',  # blank lines, CRLF, no last \n
    b'{"text": "a"}\nnope\n{"text": 5}\n{"text": "d"}\n',
    b"",
])
@pytest.mark.parametrize("rows_per_block", [1, 2, 100])
def test_blocks_read_only_their_own_rows_and_together_give_the_file(tmp_path, content, rows_per_block):
    path = tmp_path / "x.jsonl"
    path.write_bytes(content)
    whole = io.read_file(str(path), "text").to_pylist()
    assert _by_blocks(path, rows_per_block) == whole
    assert [r["_row"] for r in whole] == list(range(len(whole)))


def test_text_rows_are_lines_blank_ones_included(tmp_path):
    path = tmp_path / "t.txt"
    path.write_bytes(b"one\r\n\ntwo\nthree")
    rows = _by_blocks(path, 2)
    assert [r["text"] for r in rows] == ["one", "", "two", "three"] and [r["_row"] for r in rows] == [0, 1, 2, 3]


def test_parquet_blocks_read_their_row_groups(tmp_path):
    path = tmp_path / "p.parquet"
    pq.write_table(pa.table({"text": [f"t{i}" for i in range(10)], "id": list(range(10))}), path, row_group_size=3)
    scanned = io.scan(str(path))
    assert scanned.groups == (3, 3, 3, 1)
    blocks = scanned.blocks(4)
    assert [b["groups"] for b in blocks] == [[0, 1], [1, 2], [2, 3]]
    rows = pa.concat_tables([io.read_block(b, "text") for b in blocks]).to_pylist()
    assert [r["id"] for r in rows] == list(range(10)) and [r["_row"] for r in rows] == list(range(10))


def test_a_scan_reads_each_byte_once_and_a_block_only_its_range(tmp_path, monkeypatch):
    path = tmp_path / "big.jsonl"
    path.write_bytes(b"".join(b'{"text": "row %d"}\n' % i for i in range(50_000)))
    monkeypatch.setattr(io, "SCAN_BYTES", 64 * 1024)  # many chunks: lines straddle their edges
    scanned = io.scan(str(path))
    assert scanned.rows == 50_000
    block = scanned.blocks(1000)[17]
    assert block["end"] - block["start"] < 30 * 1000  # ~19 KB of its own rows, not the 1 MB file
    rows = io.read_block(block, "text").to_pylist()
    assert [r["text"] for r in rows] == [f"row {i}" for i in range(17_000, 18_000)]


def test_an_error_row_keeps_every_column_but_its_text(tmp_path):
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join([json.dumps({"id": "a", "text": "fine", "meta": {"k": 1}}),
                               json.dumps({"id": "b", "text": 7, "meta": {"k": 2}}),
                               json.dumps({"id": "c", "text": ["x"], "meta": {"k": 3}}),
                               json.dumps({"id": "d", "meta": {"k": 4}})]) + "\n")
    rows = io.read_file(str(path), "text").to_pylist()
    assert [r["id"] for r in rows] == ["a", "b", "c", "d"] and [r["meta"]["k"] for r in rows] == [1, 2, 3, 4]
    assert [r["error"] is None for r in rows] == [True, False, False, True]
    assert "not a string: 7" in rows[1]["error"] and rows[1]["text"] is None


def test_the_jobs_reader_skips_rows_already_done(tmp_path):
    from raylm.data import job

    path = tmp_path / "x.jsonl"
    path.write_text("".join(json.dumps({"text": f"t{i}"}) + "\n" for i in range(10)))
    blocks = job.plan_blocks([io.scan(str(path))], 4)
    read = job._reader("text", {str(path): [1, 5, 9]})
    batches = [read(pa.table({"block": [json.dumps(b)]})) for b in blocks]  # as Ray Data hands them over
    assert [r["_row"] for t in batches for r in t.to_pylist()] == [0, 2, 3, 4, 6, 7, 8]
