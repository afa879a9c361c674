"""Run a Python module as a child process that ends when its parent ends, also when the parent is killed with ``kill -9``.

Usage: ``python -m quantdag.runtime.orphan_guard <parent pid> <module> [args...]`` runs
``python -m <module> [args...]`` in this process after :func:`guard`. The ``quantdag`` command
starts its temporary Prefect API this way: a killed command leaves no server behind.
"""

from __future__ import annotations

import os
import runpy
import signal
import sys
import threading
import time

PR_SET_PDEATHSIG = 1
GRACE_SECONDS = 10.0
"""After SIGTERM, seconds the process may take to stop before it is ended with ``os._exit``."""


def _end(grace: float) -> None:
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(grace)
    os._exit(1)


def _watch(parent: int, interval: float, grace: float) -> None:
    while os.getppid() == parent:
        time.sleep(interval)
    _end(grace)


def guard(parent: int, interval: float = 1.0, grace: float = GRACE_SECONDS) -> None:
    """End this process when ``parent`` ends.

    On Linux the kernel sends SIGTERM the moment the parent dies (``prctl(PR_SET_PDEATHSIG)``);
    everywhere, a daemon thread polls the parent pid every ``interval`` seconds and sends SIGTERM,
    then ends the process ``grace`` seconds later if it is still running.

    Raises:
        SystemExit: the parent is already gone (exit status 1).
    """
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != parent:  # died before the signal was armed
        raise SystemExit(1)
    threading.Thread(target=_watch, args=(parent, interval, grace), name="orphan-guard", daemon=True).start()


def main(argv: list[str]) -> None:
    """``argv``: parent pid, module, its arguments."""
    if len(argv) < 2 or not argv[0].isdigit():
        raise SystemExit("usage: python -m quantdag.runtime.orphan_guard <parent pid> <module> [args...]")
    guard(int(argv[0]))
    sys.argv = [argv[1], *argv[2:]]
    runpy.run_module(argv[1], run_name="__main__", alter_sys=True)


if __name__ == "__main__":  # pragma: no cover - exercised through a subprocess
    main(sys.argv[1:])
