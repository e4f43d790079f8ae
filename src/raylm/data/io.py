"""Input files → rows with stable ids; rows → Parquet/JSONL. Any pyarrow filesystem (local, s3://, gs://...).

Every row carries `_source` (its file) and `_row` (its line/row number in that file): the input id that
error rows report and resume relies on. A row that cannot be decoded becomes an error row, not a crash.
"""

from __future__ import annotations

import json
from pathlib import PurePosixPath

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.json as pajson
import pyarrow.parquet as pq

FORMATS = {".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet", ".txt": "text", ".text": "text"}
ID_COLUMNS = ["_source", "_row"]
ERROR = "error"


def _filesystem(path: str) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem of a URI (s3://, gs://, ...) or a local path, and the path inside it."""
    return pafs.FileSystem.from_uri(path) if "://" in path else (pafs.LocalFileSystem(), path)


def list_inputs(spec: str) -> list[str]:
    """A file, a directory (its files, recursively) or a glob, as sorted URIs/paths of known formats."""
    fs, path = _filesystem(spec)
    prefix = spec[: len(spec) - len(path)] if "://" in spec else ""
    if any(ch in path for ch in "*?["):
        base = path[: min(path.index(ch) for ch in "*?[" if ch in path)].rsplit("/", 1)[0] or "/"
        infos = fs.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
        files = [i.path for i in infos if i.is_file and PurePosixPath(i.path).match(path)]
    else:
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.NotFound:
            raise FileNotFoundError(f"input {spec!r} does not exist")
        if info.type == pafs.FileType.Directory:
            infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
            files = [i.path for i in infos if i.is_file and not PurePosixPath(i.path).name.startswith((".", "_"))]
        else:
            files = [path]
    files = sorted(prefix + f for f in files if input_format(f) is not None)
    if not files:
        raise FileNotFoundError(f"no .jsonl, .json, .parquet or .txt files in {spec!r}")
    return files


def input_format(path: str) -> str | None:
    return FORMATS.get(PurePosixPath(path).suffix.lower())


def read_file(path: str, text_column: str) -> pa.Table:
    """One input file as rows: the id columns, the text column, any other columns the file has, `error`."""
    fmt = input_format(path)
    fs, inner = _filesystem(path)
    if fmt == "parquet":
        table = pq.read_table(inner, filesystem=fs)
        table = table.append_column(ERROR, pa.nulls(len(table), pa.string()))
    else:
        with fs.open_input_stream(inner) as f:
            raw = f.read()
        table = _read_text(raw, text_column) if fmt == "text" else _read_jsonl(raw, text_column)
    n = len(table)
    ids = pa.table({"_source": pa.array([path] * n, pa.string()), "_row": pa.array(range(n), pa.int64())})
    for name in table.column_names:
        ids = ids.append_column(name, table[name])
    return ids


def count_rows(path: str, text_column: str) -> int:
    """Rows `read_file` gives for a file: Parquet's from its footer, other formats by reading them."""
    if input_format(path) == "parquet":
        fs, inner = _filesystem(path)
        with fs.open_input_file(inner) as f:
            return pq.ParquetFile(f).metadata.num_rows
    return len(read_file(path, text_column))


def _read_text(raw: bytes, text_column: str) -> pa.Table:
    texts, errors = [], []
    for line in raw.splitlines():
        try:
            texts.append(line.decode("utf-8"))
            errors.append(None)
        except UnicodeDecodeError as exc:
            texts.append(None)
            errors.append(f"undecodable bytes: {exc.reason} at byte {exc.start}")
    return pa.table({text_column: pa.array(texts, pa.string()), ERROR: pa.array(errors, pa.string())})


def _read_jsonl(raw: bytes, text_column: str) -> pa.Table:
    try:  # the fast path: the whole file parses as one table
        table = pajson.read_json(pa.BufferReader(raw))
        if ERROR not in table.column_names:
            return table.append_column(ERROR, pa.nulls(len(table), pa.string()))
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        pass
    # A bad line somewhere: only that line fails. The good lines are parsed together, so every column keeps
    # the type they give it; bad lines become rows of nulls with their error.
    lines = [line for line in raw.splitlines() if line.strip()]
    errors = [_line_error(line, text_column) for line in lines]
    good = [line for line, e in zip(lines, errors) if e is None]
    if not good:
        return pa.table({text_column: pa.nulls(len(lines), pa.string()), ERROR: pa.array(errors, pa.string())})
    try:
        table = pajson.read_json(pa.BufferReader(b"\n".join(good)))
    except (pa.ArrowInvalid, pa.ArrowTypeError):  # types differ between good lines: keep values as JSON
        table = _as_json_text([json.loads(line) for line in good])
    table = table.drop_columns([c for c in (ERROR,) if c in table.column_names])
    bad = pa.table({f.name: pa.nulls(len(lines) - len(good), f.type) for f in table.schema})
    # Good rows first, then bad ones: `take` puts every row back on its line.
    order, next_good, next_bad = [], 0, len(good)
    for e in errors:
        order.append(next_good if e is None else next_bad)
        next_good, next_bad = next_good + (e is None), next_bad + (e is not None)
    table = pa.concat_tables([table, bad]).take(pa.array(order))
    return table.append_column(ERROR, pa.array(errors, pa.string()))


def _line_error(line: bytes, text_column: str) -> str | None:
    try:
        row = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        return f"bad JSON line: {exc}"
    if not isinstance(row, dict):
        return "bad JSON line: a line must hold a JSON object"
    text = row.get(text_column)
    if text is not None and not isinstance(text, str):
        return f"{text_column} is not a string: {json.dumps(text)[:100]}"
    return None


def _as_json_text(rows: list[dict]) -> pa.Table:
    columns = sorted({k for r in rows for k in r})
    return pa.table({c: pa.array([_as_text(r.get(c)) for r in rows], pa.string()) for c in columns})


def _as_text(value: object) -> str | None:
    if value is None or isinstance(value, str):
        return value
    return json.dumps(value)


def write_table(table: pa.Table, path: str, fmt: str) -> None:
    """Write atomically: to a temporary name, then renamed, so a killed job never leaves half a file."""
    fs, inner = _filesystem(path)
    tmp = f"{inner}.tmp"
    if fmt == "parquet":
        pq.write_table(table, tmp, filesystem=fs)
    else:
        with fs.open_output_stream(tmp) as f:
            for row in table.to_pylist():
                f.write((json.dumps(row, default=_jsonable) + "\n").encode())
    fs.move(tmp, inner)


def _jsonable(value: object) -> object:
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)
