"""`raylm usage`: the usage API's pages as one table."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

POLL_S = 0.5


def usage_table(pages: list[dict[str, Any]], kind: str) -> Any:
    """A row per bucket and group with any requests; a total row at the end."""
    from rich.table import Table

    table = Table(title=f"raylm usage: {kind}")
    tokens = ("input_tokens", "input_cached_tokens", "output_tokens") if kind == "completions" else ("input_tokens",)
    columns = ("from (UTC)", "tenant", "key", "model", "requests", *tokens)
    for column in columns:
        table.add_column(column.replace("_", " "), justify="right" if column in ("requests", *tokens) else "left")
    totals = dict.fromkeys(("num_model_requests", *tokens), 0)
    for page in pages:
        for bucket in page["data"]:
            when = datetime.fromtimestamp(bucket["start_time"], timezone.utc).strftime("%Y-%m-%d %H:%M")
            for r in bucket["results"]:
                for k in totals:
                    totals[k] += r.get(k) or 0
                table.add_row(when, r.get("project_id") or "-", r.get("api_key_id") or "-", r.get("model") or "-",
                              f"{r['num_model_requests']:,}", *(f"{r.get(t) or 0:,}" for t in tokens))
    table.add_row("total", "", "", "", f"{totals['num_model_requests']:,}", *(f"{totals[t]:,}" for t in tokens),
                  style="bold")
    return table


def follow(path: Path, emit: Callable[[str], None]) -> threading.Thread:
    """Emit each line written to `path` from now on, across rotations (a daemon thread: `raylm serve` with
    serve.access_log.stdout)."""
    def run() -> None:
        handle, inode = None, None
        while True:
            try:
                stat = path.stat()
                if handle is None or stat.st_ino != inode or stat.st_size < handle.tell():  # new or rotated
                    if handle is not None:
                        for line in handle:  # what the rotated file got last
                            emit(line.rstrip("\n"))
                        handle.close()
                    handle, inode = path.open(encoding="utf-8"), stat.st_ino
                for line in handle:
                    emit(line.rstrip("\n"))
            except OSError:  # not written yet
                pass
            time.sleep(POLL_S)

    thread = threading.Thread(target=run, name="raylm-access-log", daemon=True)
    thread.start()
    return thread
