"""The console stays quiet as raylm stops: Ray's lines about Serve's controller ending itself are dropped."""

import io
from types import SimpleNamespace

from raylm.serve.control.service import _SERVE_SHUTDOWN_NOISE, _without_lines


def test_only_the_lines_about_serves_controller_are_dropped_however_they_are_written():
    owner = SimpleNamespace(out=io.StringIO())
    kept = owner.out
    with _without_lines(owner, "out", _SERVE_SHUTDOWN_NOISE):
        for piece in ("stopping\n(raylet) Task ServeController.graceful_", "shutdown failed. There are infinite",
                      " retries remaining\n", "(raylet) Task ServeController.listen_for_change failed\n", "done"):
            print(piece, end="", file=owner.out)  # print as Ray's listener does: text, then its end
        print(file=owner.out)
        print("last words", end="", file=owner.out)  # no newline yet when the stop ends
    assert owner.out is kept
    assert kept.getvalue() == "stopping\ndone\nlast words"
