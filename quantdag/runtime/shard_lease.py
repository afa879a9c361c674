"""What a calibration shard running on another host leaves in the artifact store: a heartbeat and its record.

A shard that runs as a flow run of the ``calibrate-shard`` deployment shares nothing with the flow
that started it but the artifact store (and the Prefect API). Under
``<artifact store>/shards/<parent flow run>/<label>/<attempt>/`` it keeps:

- ``heartbeat.json``: ``{"expires": <unix seconds>, "owner": "<host>:<pid>", "flow_run_id": ...}``,
  rewritten every quarter of the lease by :class:`ShardHeartbeat` while the shard's process lives.
  A worker killed with ``kill -9`` (or a lost node) stops it; Prefect keeps showing its flow run as
  Running, so the parent judges liveness by this object alone (:meth:`ShardRecord.heartbeat_age`).
- ``done.json``: the shard's result, ``{"refs": {label: ArtifactRef}, "flow_run_id": ..., "attempt": n}``,
  written once (a conditional create: a second writer loses) after the quantizer states are
  published. The parent merges exactly the states this record names.

Objects are written with the same backends as the step leases (:mod:`quantdag.runtime.locks`: one
PUT on S3, so an object is either absent or whole; write-and-rename on a local directory).
Expiry is judged on the reader's clock: keep hosts in sync (NTP) and the lease well above the skew.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any

from quantdag.runtime.locks import _backend, _Conflict
from quantdag.runtime.store import ArtifactRef

log = logging.getLogger(__name__)

SHARDS_DIR = "shards"
HEARTBEAT = "heartbeat.json"
DONE = "done.json"


def label_slug(label: str) -> str:
    """A branch label as a path part: ``text[1]`` -> ``text-1`` (lowercase letters, digits, ``_``, ``-``)."""
    slug = re.sub(r"[^a-z0-9_]+", "-", label.lower()).strip("-")
    if not slug:
        raise ValueError(f"shard label {label!r} has no letter or digit to name its records by")
    return slug


@dataclass(frozen=True)
class ShardRecord:
    """Where one attempt of one shard keeps its heartbeat and its result.

    Attributes:
        prefix: ``<artifact store>/shards/<parent flow run>/<label slug>/<attempt>`` (a local
            directory or an ``s3://`` URL).
    """

    prefix: str

    @classmethod
    def of(cls, artifact_store: str, parent: str, label: str, attempt: int) -> ShardRecord:
        """The record of attempt ``attempt`` (0, 1, ...) of shard ``label`` started by flow run ``parent``."""
        if attempt < 0:
            raise ValueError(f"attempt {attempt} is negative: attempts count from 0")
        return cls(f"{artifact_store.rstrip('/')}/{SHARDS_DIR}/{parent}/{label_slug(label)}/{attempt}")

    def _path(self, name: str) -> tuple[Any, str]:
        backend, base = _backend(self.prefix)
        return backend, f"{base}/{name}"

    def beat(self, lease_seconds: float, flow_run_id: str | None) -> None:
        """Write the heartbeat: this process holds the shard for ``lease_seconds`` from now."""
        backend, path = self._path(HEARTBEAT)
        body = json.dumps({"expires": time.time() + lease_seconds, "lease_seconds": lease_seconds,
                           "owner": f"{socket.gethostname()}:{os.getpid()}", "flow_run_id": flow_run_id}).encode()
        current = backend.read(path)
        try:
            if current is None:
                backend.create(path, body)
            else:
                backend.replace(path, body, current[1])
        except _Conflict:  # a beat of this same holder raced it (a retried write): the next beat wins
            log.debug("heartbeat %s changed under this write; the next beat rewrites it", path)

    def heartbeat(self) -> dict[str, Any] | None:
        """The last heartbeat (``expires``, ``owner``, ``flow_run_id``), or None before the first one."""
        backend, path = self._path(HEARTBEAT)
        current = backend.read(path)
        if current is None:
            return None
        try:
            return json.loads(current[0])
        except ValueError:
            return {"expires": 0.0}  # a torn or foreign object counts as expired

    def expired_for(self, now: float | None = None) -> float | None:
        """Seconds since the heartbeat's lease ran out (negative while it holds); None before the first beat."""
        beat = self.heartbeat()
        if beat is None:
            return None
        return (time.time() if now is None else now) - float(beat.get("expires", 0.0))

    def finish(self, refs: dict[str, ArtifactRef], flow_run_id: str | None, attempt: int) -> None:
        """Publish the shard's result once.

        Raises:
            RuntimeError: a result for this attempt already exists (the attempt ran twice).
        """
        backend, path = self._path(DONE)
        body = json.dumps({"refs": {label: ref.model_dump(mode="json") for label, ref in refs.items()},
                           "flow_run_id": flow_run_id, "attempt": attempt}).encode()
        try:
            backend.create(path, body)
        except _Conflict as err:
            raise RuntimeError(f"shard record {path} already holds a result: attempt {attempt} ran twice") from err

    def result(self) -> dict[str, ArtifactRef] | None:
        """The published result (label -> quantizer-state reference), or None while there is none."""
        backend, path = self._path(DONE)
        current = backend.read(path)
        if current is None:
            return None
        data = json.loads(current[0])
        return {label: ArtifactRef.model_validate(ref) for label, ref in data["refs"].items()}


class ShardHeartbeat:
    """Context manager: keep a shard's heartbeat fresh from a daemon thread while the block runs.

    The first beat is written on entry (so a shard that cannot reach the store fails at once);
    later beats every ``lease_seconds / 4``. A beat that fails is logged and retried at the next
    interval: the lease outlives three missed beats.

    Args:
        record: the shard attempt's record.
        lease_seconds: how long one beat holds the shard (seconds).
        flow_run_id: the shard's flow run, recorded in the heartbeat.
    """

    def __init__(self, record: ShardRecord, lease_seconds: float, flow_run_id: str | None = None) -> None:
        self.record, self.lease_seconds, self.flow_run_id = record, lease_seconds, flow_run_id
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> ShardHeartbeat:
        self.record.beat(self.lease_seconds, self.flow_run_id)
        self._thread = threading.Thread(target=self._run, name="quantdag-shard-heartbeat", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.lease_seconds / 4):
            try:
                self.record.beat(self.lease_seconds, self.flow_run_id)
            except Exception as err:  # noqa: BLE001 - the next beat may get through; the lease covers 3 misses
                log.warning("could not renew shard heartbeat %s: %s", self.record.prefix, err)

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.lease_seconds)
