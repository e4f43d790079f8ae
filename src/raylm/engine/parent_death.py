"""Imported first by the forkserver a replica starts (engine/vllm.py FORKSERVER_PRELOAD), and called by each
EngineCore it forks: the process is killed when its parent dies. Ray ends a dead worker's own children (the
forkserver), not theirs; without this an EngineCore, the forkserver's child, outlived its replica (seen: 1.5
GiB left behind after a `raylm serve` that was SIGKILLed)."""

from __future__ import annotations

import ctypes
import os
import signal

PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    parent = os.getppid()
    ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:  # it died before the call took effect
        os._exit(1)


die_with_parent()
