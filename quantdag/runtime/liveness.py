"""Tell whether the process that opened a run still exists, without waiting for its heartbeat to go stale.

A flow run's MLflow parent carries :func:`process_identity` of the process running the flow
(tag :data:`PROCESS_TAG`). A later run on the same machine asks :func:`process_gone`: the pid no
longer exists, or now belongs to a process started at another time, means the flow run is dead
(killed with ``kill -9``, OOM-killed) even if its last heartbeat is seconds old. An identity
from another host, another boot or another pid namespace (another container) cannot be checked
from here: the answer is None and the heartbeat decides.

Linux only (``/proc``); elsewhere every answer is None.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

PROCESS_TAG = "quantdag.process"
"""MLflow tag of a parent run: ``host|boot id|pid namespace|pid|start time`` of the flow's process."""
_PROC = Path("/proc")


def _boot_id() -> str:
    try:
        return (_PROC / "sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _pid_namespace() -> str:
    try:
        return os.readlink(_PROC / "self/ns/pid")
    except OSError:
        return ""


def _start_ticks(pid: int) -> str | None:
    """Start time of ``pid`` in clock ticks since boot (``/proc/<pid>/stat`` field 22); None when it does not exist."""
    try:
        fields = (_PROC / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    if fields[0] == "Z":  # a zombie: it has exited, only its exit status is left
        return None
    return fields[19]


def process_identity(pid: int | None = None) -> str:
    """``host|boot id|pid namespace|pid|start ticks`` of a process of this machine (default: this one)."""
    pid = os.getpid() if pid is None else pid
    return "|".join((socket.gethostname(), _boot_id(), _pid_namespace(), str(pid), _start_ticks(pid) or ""))


def describe(identity: str) -> str:
    """``pid <pid> on <host>`` for an identity from :func:`process_identity`."""
    parts = identity.split("|")
    return f"pid {parts[3]} on {parts[0]}" if len(parts) == 5 else identity or "an unknown process"


def process_gone(identity: str | None) -> bool | None:
    """Whether the process of ``identity`` has ended.

    Returns:
        True when it ran on this host, boot and pid namespace and its pid is gone or reused by a
        later process; False when it still runs; None when that cannot be told from here
        (another host, boot or container, no ``/proc``, no or malformed identity).
    """
    parts = (identity or "").split("|")
    if len(parts) != 5 or not all(parts[1:]) or not parts[3].isdigit():
        return None
    host, boot, namespace, pid, ticks = parts
    if (host, boot, namespace) != (socket.gethostname(), _boot_id(), _pid_namespace()) or not _boot_id():
        return None
    return _start_ticks(int(pid)) != ticks
