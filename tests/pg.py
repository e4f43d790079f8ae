"""A real PostgreSQL server for tests: Debian's binaries, a throw-away cluster, trust auth, 127.0.0.1 only.

    initdb (tmp dir) ─► pg_ctl start -w (a free port, its socket in the tmp dir, fsync off) ─► createdb raylm
    ─► yield postgresql://postgres@127.0.0.1:<port>/raylm ─► pg_ctl stop -m fast ─► tmp dir removed

initdb and postgres refuse to run as root: as root, they run as the `postgres` user, who owns the tmp dir.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from helpers import free_port

WAIT_S = 30  # pg_ctl's bound on start and stop; each command's own timeout is a little longer


def postgres_bin() -> Path | None:
    """The newest installed server's bin folder (/usr/lib/postgresql/<version>/bin), if any."""
    found = glob.glob("/usr/lib/postgresql/*/bin/initdb")
    if not found:
        return None
    return Path(max(found, key=lambda p: int(Path(p).parts[-3]) if Path(p).parts[-3].isdigit() else 0)).parent


@contextlib.contextmanager
def postgres_server() -> Iterator[str]:
    """A started server's URL, with an empty database `raylm`; stopped and deleted on exit."""
    bin_dir = postgres_bin()
    if bin_dir is None:
        pytest.skip("PostgreSQL's server is not installed (/usr/lib/postgresql/*/bin/initdb); .ci/run installs it")
    user: dict[str, Any] = {}
    root = Path(tempfile.mkdtemp(prefix="raylm-pg-"))  # short: a unix socket's path is at most 107 bytes
    if os.geteuid() == 0:
        try:
            account = pwd.getpwnam("postgres")
        except KeyError:
            shutil.rmtree(root)
            pytest.skip("running as root without a `postgres` user to run PostgreSQL as")
        os.chown(root, account.pw_uid, account.pw_gid)
        user = {"user": account.pw_uid, "group": account.pw_gid}
    data, port = root / "data", free_port()

    def run(*cmd: str, timeout: float = WAIT_S + 10) -> None:
        subprocess.run(cmd, cwd=root, check=True, capture_output=True, timeout=timeout, **user)

    pg_ctl = (str(bin_dir / "pg_ctl"), "-D", str(data), "-w", "-t", str(WAIT_S))  # -w: waits until it answers
    options = f"-h 127.0.0.1 -p {port} -k {root} -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
    try:
        try:
            run(str(bin_dir / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres", "-E", "UTF8",
                "--locale=C", "--no-sync")
            run(*pg_ctl, "-l", str(root / "log"), "-o", options, "start")
            run(str(bin_dir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "raylm")
        except subprocess.SubprocessError as exc:
            stderr = (getattr(exc, "stderr", None) or b"").decode(errors="replace")
            log = (root / "log").read_text()[-2000:] if (root / "log").exists() else ""
            raise RuntimeError(f"PostgreSQL did not start: {exc}\n{stderr}\n{log}") from None
        yield f"postgresql://postgres@127.0.0.1:{port}/raylm"
    finally:  # a start that timed out may have left a server running: stopped too
        with contextlib.suppress(subprocess.SubprocessError):
            run(*pg_ctl, "-m", "fast", "stop")
        shutil.rmtree(root, ignore_errors=True)
