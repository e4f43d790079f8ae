"""The Batch API's files and batches on disk, each scoped to the tenant that made it.

    <batch_dir>/files/<file id>            the bytes, as uploaded (or as a batch wrote them)
    <batch_dir>/files/<file id>.json       the OpenAI file object, plus its tenant
    <batch_dir>/batches/<batch id>/batch.json   the OpenAI batch object, plus its tenant
    <batch_dir>/batches/<batch id>/input.txt    the input file's requests, copied when the batch was made
    <batch_dir>/batches/<batch id>/out/          the Ray Data job's output (data/, errors/: raylm data's resume)
    <batch_dir>/batches/<batch id>/cancel        present once a cancel was asked for

Every JSON record is written whole (temporary name, then rename), so a reader in another process (the
ingress reads, the BatchJobs deployment writes) never sees half of one, and a killed service leaves none
behind. Another owner's object is "not found", as if it did not exist; so is an expired file, which is
deleted when it is next looked at (and by BatchJobs' sweep). Every method here blocks on the disk: the
ingress calls them on a thread, never on the event loop that relays streams.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from pathlib import Path
from typing import Any

from raylm import errors

TENANT = "_tenant"  # raylm's own key in a record; never sent to a client


def new_id(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:24]}"


def write_whole(path: Path, data: bytes) -> None:
    """Written to a temporary name, then renamed: a reader sees all of it or none."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def write_json(path: Path, record: dict[str, Any]) -> None:
    write_whole(path, json.dumps(record).encode())


def request_lines(content: bytes) -> list[bytes]:
    """A batch file's requests: its lines, blank ones left out."""
    return [line.rstrip(b"\r") for line in content.split(b"\n") if line.strip()]


def public(record: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in record.items() if k != TENANT}


def page(records: list[dict[str, Any]], limit: int, after: str | None) -> dict[str, Any]:
    """OpenAI's cursor page: newest first, `after` the last id the client has seen."""
    records = sorted(records, key=lambda r: (r["created_at"], r["id"]), reverse=True)
    if after is not None:
        ids = [r["id"] for r in records]
        records = records[ids.index(after) + 1:] if after in ids else []
    data = [public(r) for r in records[:limit]]
    return {"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None, "has_more": len(records) > limit}


class Store:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.files_dir = self.root / "files"
        self.batches_dir = self.root / "batches"
        self.files_dir.mkdir(parents=True, exist_ok=True)
        self.batches_dir.mkdir(parents=True, exist_ok=True)

    # files
    def _record(self, tenant: str, filename: str, purpose: str, size: int, ttl_s: int) -> dict[str, Any]:
        now = int(time.time())
        return {"id": new_id("file-"), "object": "file", "bytes": size, "created_at": now,
                "expires_at": now + ttl_s, "filename": filename, "purpose": purpose, "status": "processed",
                "status_details": None, TENANT: tenant}

    def create_file(self, tenant: str, filename: str, purpose: str, content: bytes, ttl_s: int) -> dict[str, Any]:
        record = self._record(tenant, filename, purpose, len(content), ttl_s)
        write_whole(self.files_dir / record["id"], content)
        write_json(self.files_dir / f"{record['id']}.json", record)
        return record

    def adopt_file(self, tenant: str, filename: str, purpose: str, path: Path, size: int,
                   ttl_s: int) -> dict[str, Any]:
        """A file already written under this folder (a streamed upload) becomes a File object."""
        record = self._record(tenant, filename, purpose, size, ttl_s)
        os.replace(path, self.files_dir / record["id"])
        write_json(self.files_dir / f"{record['id']}.json", record)
        return record

    def file(self, tenant: str, file_id: str) -> dict[str, Any]:
        record = self._read(self.files_dir / f"{_safe(file_id)}.json")
        if record is not None and _expired(record):
            self._delete(record)
            record = None
        if record is None or record[TENANT] != tenant:
            raise errors.NotFoundError(f"No such File object: {file_id}", param="file_id", code="file_not_found")
        return record

    def file_path(self, tenant: str, file_id: str) -> Path:
        return self.files_dir / self.file(tenant, file_id)["id"]

    def files(self, tenant: str | None, purpose: str | None = None) -> list[dict[str, Any]]:
        """An owner's live files (every owner's for None); expired ones are deleted on the way."""
        live = []
        for record in (self._read(p) for p in self.files_dir.glob("file-*.json")):
            if record is None or tenant not in (None, record[TENANT]):
                continue
            if _expired(record):
                self._delete(record)
            elif purpose in (None, record["purpose"]):
                live.append(record)
        return live

    def usage(self, tenant: str) -> tuple[int, int]:
        """An owner's live files: (bytes, count), for its quota."""
        files = self.files(tenant)
        return sum(r["bytes"] for r in files), len(files)

    def delete_file(self, tenant: str, file_id: str) -> dict[str, Any]:
        record = self.file(tenant, file_id)
        self._delete(record)
        return {"id": record["id"], "object": "file", "deleted": True}

    def _delete(self, record: dict[str, Any]) -> None:
        (self.files_dir / f"{record['id']}.json").unlink(missing_ok=True)
        (self.files_dir / record["id"]).unlink(missing_ok=True)

    # batches
    def batch_dir(self, batch_id: str) -> Path:
        return self.batches_dir / _safe(batch_id)

    def save_batch(self, record: dict[str, Any]) -> None:
        folder = self.batch_dir(record["id"])
        folder.mkdir(exist_ok=True)
        write_json(folder / "batch.json", record)

    def batch(self, tenant: str, batch_id: str) -> dict[str, Any]:
        record = self._read(self.batch_dir(batch_id) / "batch.json")
        if record is None or record[TENANT] != tenant:
            raise errors.NotFoundError(f"No such Batch object: {batch_id}", param="batch_id",
                                       code="batch_not_found")
        return record

    def batches(self, tenant: str | None = None) -> list[dict[str, Any]]:
        records = (self._read(p / "batch.json") for p in self.batches_dir.glob("batch_*"))
        return [r for r in records if r and tenant in (None, r[TENANT])]

    @staticmethod
    def _read(path: Path) -> dict[str, Any] | None:
        try:
            return json.loads(path.read_text())
        except (FileNotFoundError, NotADirectoryError):
            return None


def _expired(record: dict[str, Any]) -> bool:
    return record.get("expires_at") is not None and record["expires_at"] <= time.time()


def _safe(object_id: str) -> str:
    """An id as a file name: ids are ours (prefix + hex); anything else names nothing."""
    return object_id if object_id.replace("-", "").replace("_", "").isalnum() else "-"
