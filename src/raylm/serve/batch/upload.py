"""`POST /v1/files` as it streams: a multipart body parsed as it arrives (python-multipart, the parser under
Starlette's forms), its one file part written to the batch folder as it comes, and refused the moment it
passes what the tenant may store.

    body chunks (serve.http.body_timeout_s between them) ─► MultipartParser
        `file` part ─► a temporary file in <batch_dir>/files, written off the event loop a MiB at a time;
                       past the file's room (batch_max_file_bytes, and what is left of the tenant's
                       batch_max_stored_bytes) ─► 413 / 429 at once, the temporary file removed
        `purpose`, `expires_after[anchor]`, `expires_after[seconds]` ─► small fields (≤ 1 KiB each)
        a second file part, an unknown part, a malformed body ─► 400

Starlette's own form parser spools a file part of any size to a temporary file before the route sees it:
the disk would hold a 2 GiB upload before a limit could be checked.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from fastapi import Request
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

from raylm import errors
from raylm.serve.edge import http

FIELD_BYTES = 1024  # a form field (purpose, expires_after[...]) is a short word or number
FORM_OVERHEAD = 64 * 1024  # boundaries, part headers and fields around the file
FLUSH_BYTES = 2**20  # written to disk a MiB at a time, each write on a thread
FIELDS = ("purpose", "expires_after[anchor]", "expires_after[seconds]")


@dataclass
class Upload:
    """What a finished upload holds: the file (already on disk, under a temporary name) and the fields."""

    path: Path
    filename: str = "upload.jsonl"
    size: int = 0
    lines: int = 0  # non-blank lines: a batch file's requests
    fields: dict[str, str] = field(default_factory=dict)


class _Parts:
    """The parser's callbacks: collects fields, buffers the file part's bytes for the next flush."""

    def __init__(self, room: int, too_big: errors.APIError) -> None:
        self.room, self.too_big = room, too_big
        self.name: str | None = None
        self.filename: str | None = None
        self.files = 0
        self.header_field, self.header_value, self.headers = b"", b"", {}
        self.pending = bytearray()  # file bytes not yet on disk
        self.size = 0
        self.fields: dict[str, bytearray] = {}
        self.lines = _LineCounter()

    def callbacks(self) -> dict[str, Any]:
        return {"on_part_begin": self.part_begin, "on_header_field": self.header_field_data,
                "on_header_value": self.header_value_data, "on_header_end": self.header_end,
                "on_headers_finished": self.headers_finished, "on_part_data": self.part_data}

    def part_begin(self) -> None:
        self.headers, self.name = {}, None

    def header_field_data(self, data: bytes, start: int, end: int) -> None:
        self.header_field += data[start:end]

    def header_value_data(self, data: bytes, start: int, end: int) -> None:
        self.header_value += data[start:end]

    def header_end(self) -> None:
        self.headers[self.header_field.lower()] = self.header_value
        self.header_field, self.header_value = b"", b""

    def headers_finished(self) -> None:
        _, options = parse_options_header(self.headers.get(b"content-disposition", b""))
        name = options.get(b"name", b"").decode("utf-8", "replace")
        if name == "file":
            self.files += 1
            if self.files > 1:
                raise errors.InvalidRequestError("an upload holds exactly one file part", param="file",
                                                 code="too_many_files")
            self.filename = options.get(b"filename", b"upload.jsonl").decode("utf-8", "replace")[:255]
        elif name not in FIELDS:
            raise errors.InvalidRequestError(f"unknown form field {name[:64]!r}", param=name[:64] or None)
        elif name in self.fields:
            raise errors.InvalidRequestError(f"form field {name!r} given twice", param=name)
        else:
            self.fields[name] = bytearray()
        self.name = name

    def part_data(self, data: bytes, start: int, end: int) -> None:
        chunk = data[start:end]
        if self.name == "file":
            self.size += len(chunk)
            if self.size > self.room:
                raise self.too_big
            self.pending += chunk
            self.lines.feed(chunk)
        elif self.name is not None:
            value = self.fields[self.name]
            if len(value) + len(chunk) > FIELD_BYTES:
                raise errors.InvalidRequestError(f"form field {self.name!r} is too long", param=self.name)
            value += chunk


class _LineCounter:
    """Lines of a stream, counted as it passes at C speed (bytes.count): at most one more than its non-blank
    lines per blank line, so an upper bound of a batch file's requests (`exact` counts a file that passes it)."""

    def __init__(self) -> None:
        self.count, self._open = 0, False  # _open: a line is in progress

    def feed(self, chunk: bytes) -> None:
        if chunk:
            self.count += chunk.count(b"\n")
            self._open = not chunk.endswith(b"\n")

    def total(self) -> int:
        return self.count + self._open


def exact_lines(path: Path) -> int:
    """Non-blank lines of a file, read a MiB at a time (blocking: call it on a thread)."""
    count, carry = 0, b""
    with path.open("rb") as f:
        while block := f.read(FLUSH_BYTES):
            *whole, carry = (carry + block).split(b"\n")
            count += sum(1 for line in whole if line.strip())
    return count + bool(carry.strip())


async def receive(request: Request, folder: Path, room: int, too_big: errors.APIError, idle_s: float) -> Upload:
    """Stream the multipart body's file into `folder` (at most `room` bytes, else `too_big`)."""
    media_type, options = parse_options_header(request.headers.get("content-type", ""))
    boundary = options.get(b"boundary")
    if media_type != b"multipart/form-data" or not boundary:
        raise errors.InvalidRequestError("the body must be multipart/form-data with a file part", param="file",
                                         code="invalid_multipart")
    parts = _Parts(room, too_big)
    parser = MultipartParser(boundary, parts.callbacks())
    upload = Upload(folder / f".upload-{uuid.uuid4().hex}.tmp")
    out: BinaryIO = await asyncio.to_thread(open, upload.path, "wb")
    try:
        try:
            async for chunk in http.body_chunks(request, room + FORM_OVERHEAD, idle_s):
                parser.write(chunk)
                if len(parts.pending) >= FLUSH_BYTES:
                    await _flush(out, parts.pending)
            parser.finalize()
        except errors.RequestTooLargeError:
            raise too_big from None
        except MultipartParseError as exc:
            raise errors.InvalidRequestError(f"the multipart body is malformed: {exc}", param="file",
                                             code="invalid_multipart") from None
        await _flush(out, parts.pending)
    except BaseException:
        await asyncio.to_thread(_discard, out, upload.path)
        raise
    await asyncio.to_thread(out.close)
    if parts.files == 0:
        await asyncio.to_thread(upload.path.unlink, True)
        raise errors.InvalidRequestError("a file is required", param="file", code="missing_file")
    upload.filename, upload.size, upload.lines = parts.filename or upload.filename, parts.size, parts.lines.total()
    upload.fields = {k: v.decode("utf-8", "replace") for k, v in parts.fields.items()}
    return upload


async def _flush(out: BinaryIO, pending: bytearray) -> None:
    if pending:
        data = bytes(pending)
        pending.clear()
        await asyncio.to_thread(out.write, data)


def _discard(out: BinaryIO, path: Path) -> None:
    with contextlib.suppress(OSError):
        out.close()
    path.unlink(missing_ok=True)
