"""Input files → rows with stable ids; rows → Parquet/JSONL. Any pyarrow filesystem (local, s3://, gs://...).

Every row carries `_source` (its file) and `_row` (its line/row number in that file): the input id that
error rows report and resume relies on. A row that cannot be decoded becomes an error row, not a crash, and
keeps every column it has (only its text is missing).

Cost grows with the rows, not rows × blocks: each file is scanned once to plan (`scan`: Parquet's footer and
row groups; JSONL and text by line offsets, found with numpy a chunk at a time), and each block reads only its
own byte range or row groups (`read_block`), so a read task holds one block, never the file.

    JSONL   a row per line that is not blank (as pyarrow's reader skips blank lines)
    text    a row per line ("\n"; a trailing "\r" dropped), blank ones included
    Parquet a row per row
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any

import numpy as np
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


def file_size(path: str) -> int:
    fs, inner = _filesystem(path)
    return fs.get_file_info(inner).size or 0


def input_format(path: str) -> str | None:
    return FORMATS.get(PurePosixPath(path).suffix.lower())


SCAN_BYTES = 64 * 2**20  # a scan reads this much at a time
_WHITESPACE = np.array([9, 10, 11, 12, 13, 32], np.uint8)


@dataclass(frozen=True)
class Scan:
    """Where a file's rows are: each row's byte span (JSONL, text), or the rows of each row group (Parquet)."""

    path: str
    starts: np.ndarray | None = None  # row i is bytes [starts[i], ends[i])
    ends: np.ndarray | None = None
    groups: tuple[int, ...] = ()  # Parquet: rows per row group

    @property
    def rows(self) -> int:
        return sum(self.groups) if self.starts is None else len(self.starts)

    def blocks(self, rows_per_block: int) -> list[dict[str, Any]]:
        """Ranges of about `rows_per_block` rows, each with what its read needs (no more than its rows)."""
        if self.starts is None:
            return self._group_blocks(rows_per_block)
        return [{"path": self.path, "lo": lo, "hi": hi, "start": int(self.starts[lo]), "end": int(self.ends[hi - 1])}
                for lo in range(0, self.rows, rows_per_block) for hi in [min(self.rows, lo + rows_per_block)]]

    def _group_blocks(self, rows_per_block: int) -> list[dict[str, Any]]:
        """Whole row groups a block (a group larger than a block is read by each of its blocks)."""
        blocks = []
        group_start = np.concatenate([[0], np.cumsum(self.groups)]).astype(int)
        for lo in range(0, self.rows, rows_per_block):
            hi = min(self.rows, lo + rows_per_block)
            groups = [g for g in range(len(self.groups)) if group_start[g] < hi and group_start[g + 1] > lo]
            first = int(group_start[groups[0]])
            blocks.append({"path": self.path, "lo": lo, "hi": hi, "groups": groups, "first": first})
        return blocks


def scan(path: str) -> Scan:
    """One pass over a file (its footer only, for Parquet) to find its rows."""
    fs, inner = _filesystem(path)
    fmt = input_format(path)
    if fmt == "parquet":
        with fs.open_input_file(inner) as f:
            meta = pq.ParquetFile(f).metadata
            return Scan(path, groups=tuple(meta.row_group(i).num_rows for i in range(meta.num_row_groups)))
    with fs.open_input_stream(inner) as f:
        starts, ends = _line_spans(f, keep_blank=fmt == "text")
    return Scan(path, starts, ends)


def _line_spans(f: Any, keep_blank: bool) -> tuple[np.ndarray, np.ndarray]:
    """Byte spans of a stream's lines (without their "\n"), blank ones left out unless `keep_blank`."""
    starts: list[np.ndarray] = []
    ends: list[np.ndarray] = []
    base, line_start, line_has_content = 0, 0, False
    while chunk := f.read(SCAN_BYTES):
        data = np.frombuffer(chunk, np.uint8)
        newlines = np.flatnonzero(data == 10)
        content = np.concatenate([[0], np.cumsum(~np.isin(data, _WHITESPACE))])
        seg_start = np.concatenate([[0], newlines + 1])
        seg_end = np.concatenate([newlines, [len(data)]])
        has = content[seg_end] - content[seg_start] > 0
        if len(newlines):
            has[0] |= line_has_content  # the first segment ends the line carried from the chunk before
            line_starts = np.concatenate([[line_start], base + seg_start[1:-1]])
            keep = has[:-1] | keep_blank
            starts.append(line_starts[keep])
            ends.append((base + newlines)[keep])
            line_start, line_has_content = base + int(seg_start[-1]), bool(has[-1])
        else:
            line_has_content |= bool(has[0])
        base += len(data)
    if base > line_start and (line_has_content or keep_blank):  # a last line without "\n"
        starts.append(np.array([line_start]))
        ends.append(np.array([base]))
    empty = np.array([], np.int64)
    return (np.concatenate(starts).astype(np.int64) if starts else empty,
            np.concatenate(ends).astype(np.int64) if ends else empty)


def read_block(block: dict[str, Any], text_column: str) -> pa.Table:
    """One block's rows (Scan.blocks): the id columns, the text column, any other columns, `error`."""
    path, lo, hi = block["path"], block["lo"], block["hi"]
    fs, inner = _filesystem(path)
    fmt = input_format(path)
    if fmt == "parquet":
        with fs.open_input_file(inner) as f:
            table = pq.ParquetFile(f).read_row_groups(block["groups"])
        table = table.slice(lo - block["first"], hi - lo)
        table = table.append_column(ERROR, pa.nulls(len(table), pa.string()))
    else:
        with fs.open_input_file(inner) as f:
            raw = f.read_at(block["end"] - block["start"], block["start"]) if hi > lo else b""
        table = _read_text(raw, text_column, hi - lo) if fmt == "text" else _read_jsonl(raw, text_column)
        if len(table) != hi - lo:
            raise ValueError(f"{path}: rows {lo}-{hi} changed since the job was planned")
    return _with_ids(table, path, lo)


def read_file(path: str, text_column: str) -> pa.Table:
    """A whole input file as rows (one block of all of it)."""
    blocks = scan(path).blocks(2**62)
    return read_block(blocks[0], text_column) if blocks else _with_ids(_read_text(b"", text_column, 0), path, 0)


def _with_ids(table: pa.Table, path: str, first_row: int) -> pa.Table:
    n = len(table)
    ids = pa.table({"_source": pa.array([path] * n, pa.string()),
                    "_row": pa.array(range(first_row, first_row + n), pa.int64())})
    for name in table.column_names:
        ids = ids.append_column(name, table[name])
    return ids


def _read_text(raw: bytes, text_column: str, rows: int) -> pa.Table:
    """`rows` lines: a block's bytes run from its first line's start to its last line's end (no "\n")."""
    texts, errors = [], []
    for line in (line.removesuffix(b"\r") for line in (raw.split(b"\n") if rows else [])):
        try:
            texts.append(line.decode("utf-8"))
            errors.append(None)
        except UnicodeDecodeError as exc:
            texts.append(None)
            errors.append(f"undecodable bytes: {exc.reason} at byte {exc.start}")
    return pa.table({text_column: pa.array(texts, pa.string()), ERROR: pa.array(errors, pa.string())})


def _read_jsonl(raw: bytes, text_column: str) -> pa.Table:
    try:  # the fast path: every line parses into one table, its text a string column
        table = pajson.read_json(pa.BufferReader(raw))
        text = table.column(text_column) if text_column in table.column_names else None
        if text is not None and pa.types.is_null(text.type):
            table = table.set_column(table.column_names.index(text_column), text_column, text.cast(pa.string()))
        elif text is not None and not pa.types.is_string(text.type):
            raise pa.ArrowTypeError("the text column is not a string column")  # each line is checked below
        if ERROR not in table.column_names:
            return table.append_column(ERROR, pa.nulls(len(table), pa.string()))
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        pass
    # A bad line somewhere: only that line fails. A line that is a JSON object keeps every column, its text
    # nulled if that is what is wrong with it (the error says what it was); only a line that is not one becomes
    # a row of nulls. The kept lines are parsed together, so every column keeps the type they give it.
    lines = [line for line in raw.split(b"\n") if line.strip()]
    checked = [_check_line(line, text_column) for line in lines]
    errors = [error for error, _ in checked]
    kept = [line for _, line in checked if line is not None]
    if not kept:
        return pa.table({text_column: pa.nulls(len(lines), pa.string()), ERROR: pa.array(errors, pa.string())})
    try:
        table = pajson.read_json(pa.BufferReader(b"\n".join(kept)))
    except (pa.ArrowInvalid, pa.ArrowTypeError):  # types differ between lines: keep values as JSON
        table = _as_json_text([json.loads(line) for line in kept])
    table = table.drop_columns([c for c in (ERROR,) if c in table.column_names])
    if text_column not in table.column_names:
        table = table.append_column(text_column, pa.nulls(len(table), pa.string()))
    lost = pa.table({f.name: pa.nulls(len(lines) - len(kept), f.type) for f in table.schema})
    # Kept rows first, then lost ones: `take` puts every row back on its line.
    order, next_kept, next_lost = [], 0, len(kept)
    for _, line in checked:
        order.append(next_kept if line is not None else next_lost)
        next_kept, next_lost = next_kept + (line is not None), next_lost + (line is None)
    table = pa.concat_tables([table, lost]).take(pa.array(order))
    return table.append_column(ERROR, pa.array(errors, pa.string()))


def _check_line(line: bytes, text_column: str) -> tuple[str | None, bytes | None]:
    """(error, the line to parse): the line as it is; with its text nulled when that is not a string; None
    when it is not a JSON object at all."""
    try:
        row = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        return f"bad JSON line: {exc}", None
    if not isinstance(row, dict):
        return "bad JSON line: a line must hold a JSON object", None
    text = row.get(text_column)
    if text is not None and not isinstance(text, str):
        row[text_column] = None
        return f"{text_column} is not a string: {json.dumps(text)[:100]}", json.dumps(row).encode()
    return None, line


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
