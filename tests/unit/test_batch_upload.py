"""`POST /v1/files` as it streams (serve/batch/upload.py), in process: one file part, written as it comes,
refused past its room with nothing left on disk."""

import pytest
from fastapi import FastAPI, Request
from starlette.testclient import TestClient

from raylm import errors
from raylm.serve.batch import upload
from raylm.serve.edge import http

ROOM = 4096


@pytest.fixture
def client(tmp_path):
    app = FastAPI()

    @app.post("/v1/files")
    async def create(request: Request):
        try:
            got = await upload.receive(request, tmp_path, ROOM, errors.RequestTooLargeError(ROOM), 5)
        except errors.APIError as exc:
            return http.error_response(exc, "r")
        return {"size": got.size, "lines": got.lines, "fields": got.fields, "name": got.filename,
                "content": got.path.read_text()}

    return TestClient(app), tmp_path


def test_the_file_and_fields_arrive(client):
    c, folder = client
    r = c.post("/v1/files", files={"file": ("in.jsonl", b'{"a": 1}\n\n{"b": 2}\n')},
               data={"purpose": "batch", "expires_after[anchor]": "created_at", "expires_after[seconds]": "3600"})
    body = r.json()
    assert (body["size"], body["lines"], body["name"]) == (19, 3, "in.jsonl")  # lines: an upper bound
    assert body["fields"] == {"purpose": "batch", "expires_after[anchor]": "created_at",
                              "expires_after[seconds]": "3600"}


def test_a_file_past_its_room_is_refused_and_nothing_stays_on_disk(client):
    c, folder = client
    r = c.post("/v1/files", files={"file": ("in.jsonl", b"x" * (ROOM + 1))}, data={"purpose": "batch"})
    assert r.status_code == 413 and list(folder.iterdir()) == []


def test_a_chunked_upload_without_a_length_is_cut_at_its_room(client):
    c, folder = client
    boundary = "b0undary"

    def body():
        yield f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"x\"\r\n\r\n".encode()
        for _ in range(1000):  # 1 MiB meant, 4 KiB allowed
            yield b"y" * 1024
        yield f"\r\n--{boundary}--\r\n".encode()

    r = c.post("/v1/files", content=body(), headers={"content-type": f"multipart/form-data; boundary={boundary}"})
    assert r.status_code == 413 and list(folder.iterdir()) == []


@pytest.mark.parametrize("files,data,code", [
    ([("file", ("a", b"1")), ("file", ("b", b"2"))], {"purpose": "batch"}, "too_many_files"),
    ([], {"purpose": "batch"}, "missing_file"),
    ([("file", ("a", b"1"))], {"other": "x"}, "invalid_value"),
])
def test_a_form_with_two_files_none_or_an_unknown_field_is_400(client, files, data, code):
    c, folder = client
    # a form without a file: its one field sent as a part of its own (a multipart body all the same)
    r = c.post("/v1/files", files=files, data=data) if files else c.post("/v1/files", files={"purpose": (None, b"batch")})
    assert (r.status_code, r.json()["error"]["code"]) == (400, code)
    assert list(folder.iterdir()) == []


def test_a_body_that_is_not_multipart_or_is_malformed_is_400(client):
    c, _ = client
    assert c.post("/v1/files", json={"a": 1}).json()["error"]["code"] == "invalid_multipart"
    bad = c.post("/v1/files", content=b"--x\r\nno headers end",
                 headers={"content-type": "multipart/form-data; boundary=x"})
    assert bad.status_code == 400


def test_the_exact_count_leaves_blank_lines_out(tmp_path):
    path = tmp_path / "f.jsonl"
    path.write_bytes(b'{"a": 1}\n\n  \r\n{"b": 2}\n' * 100_000 + b'{"c": 3}')
    assert upload.exact_lines(path) == 200_001
