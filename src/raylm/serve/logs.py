"""Where a replica's own log lines go: raylm's and vLLM's loggers to the process's stderr, which Serve writes
to the replica's log file (and the console with `raylm serve -v`)."""

from __future__ import annotations

import logging


def log_to_stderr(*names: str) -> None:
    """INFO and above of these loggers to the replica's stderr, which Serve writes to the replica's log
    file (the console too with -v): what vLLM's own logging setup did, off in replicas (see
    hardware.engine_env)."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    for name in names:
        named = logging.getLogger(name)
        if not named.handlers:
            named.addHandler(handler)
            named.setLevel(logging.INFO)
            named.propagate = False
