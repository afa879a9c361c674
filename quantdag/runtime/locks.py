"""Locks that a killed holder cannot keep forever: leased step locks and GPU slots.

Two kinds of mutual exclusion keep quantdag's steps from doing the same work twice or sharing
a GPU:

- :class:`LeaseLockManager`, Prefect's ``LockManager`` for SERIALIZABLE task transactions: two
  flow runs that reach the same step with the same cache key compute it once; the second waits,
  then reads the first one's result as a cache hit. Prefect's own file and Redis lock managers
  never expire, so a holder killed with ``kill -9`` would block that step forever. Here a lock is
  a *lease*: a small JSON object (holder, owner, expiry) renewed by a heartbeat thread while the
  holder lives, and taken over by the next run once it has expired.
- :func:`gpu_slots`, ONE free GPU among the visible ones: the slot of its Prefect global
  concurrency limit (``gpu-<i>``, limit 1), taken with ``strict=True`` (a missing limit fails
  instead of only warning) and a server-side lease. A worker started with one GPU in
  ``CUDA_VISIBLE_DEVICES`` takes that GPU; a process that sees several (one flow run whose
  worker processes calibrate on two GPUs at once) takes the first free one, and
  :func:`current_gpu` tells the code inside which one (its ``cuda:<ordinal>``).

Leases live beside the result records they guard (``<Prefect result storage>/locks``), so
they are shared exactly when results are. On S3 the object is created with ``If-None-Match: *``
and renewed, stolen or deleted with ``If-Match: <etag>`` (S3 conditional writes), so two runs
never both believe they hold it; on a local directory the same steps run under an ``flock``
guard file. Expiry is judged on the reader's clock: keep hosts' clocks in sync (NTP) and the
lease well above the skew.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import contextvars
import fcntl
import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import fsspec

from conf.settings import Settings, settings

log = logging.getLogger(__name__)


def lease_seconds() -> float:
    """The step-lock lease in seconds (``QUANTDAG_LOCK_LEASE_SECONDS``, default 120; :mod:`conf.settings`)."""
    return settings().lock_lease_seconds


# ------------------------------------------------------------------------------------ backends
class _Conflict(Exception):
    """A conditional write lost: the object exists (create) or changed (replace)."""


def _is_conflict(err: BaseException) -> bool:
    while err is not None:
        response = getattr(err, "response", None)
        if isinstance(response, dict):
            code = response.get("Error", {}).get("Code")
            status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code in ("PreconditionFailed", "ConditionalRequestConflict") or status in (409, 412):
                return True
        err = err.__cause__
    return False


class _S3Leases:
    """Lease objects on S3 through s3fs, with conditional PUT/DELETE."""

    def __init__(self, fs: Any) -> None:
        self.fs = fs

    def _split(self, path: str) -> tuple[str, str]:
        bucket, _, key = path.partition("/")
        return bucket, key

    def create(self, path: str, body: bytes) -> str:
        bucket, key = self._split(path)
        try:
            return self.fs.call_s3("put_object", Bucket=bucket, Key=key, Body=body, IfNoneMatch="*")["ETag"]
        except Exception as err:  # noqa: BLE001 - s3fs translates ClientError; classify by its cause
            if isinstance(err, FileExistsError) or _is_conflict(err):
                raise _Conflict(path) from err
            raise

    def read(self, path: str) -> tuple[bytes, str] | None:
        try:
            etag = self.fs.info(path, refresh=True)["ETag"]
            return self.fs.cat_file(path), etag
        except FileNotFoundError:
            return None

    def replace(self, path: str, body: bytes, etag: str) -> str:
        bucket, key = self._split(path)
        try:
            return self.fs.call_s3("put_object", Bucket=bucket, Key=key, Body=body, IfMatch=etag)["ETag"]
        except Exception as err:  # noqa: BLE001
            if isinstance(err, FileNotFoundError) or _is_conflict(err):
                raise _Conflict(path) from err
            raise

    def delete(self, path: str, etag: str) -> None:
        bucket, key = self._split(path)
        try:
            self.fs.call_s3("delete_object", Bucket=bucket, Key=key, IfMatch=etag)
        except Exception as err:  # noqa: BLE001
            if not (isinstance(err, FileNotFoundError) or _is_conflict(err)):
                raise


class _LocalLeases:
    """Lease files on a local (or NFS-with-flock) directory; each operation runs under a guard flock."""

    @contextlib.contextmanager
    def _guard(self, path: str) -> Iterator[None]:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(f"{path}.guard", os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # released by the kernel if this process dies
            yield
        finally:
            os.close(fd)

    @staticmethod
    def _etag(path: str) -> str:
        stat = os.stat(path)
        return f"{stat.st_ino}-{stat.st_mtime_ns}-{stat.st_size}"

    def _write(self, path: str, body: bytes) -> str:
        tmp = f"{path}.{uuid.uuid4().hex}.tmp"
        with open(tmp, "wb") as handle:
            handle.write(body)
        os.replace(tmp, path)
        return self._etag(path)

    def create(self, path: str, body: bytes) -> str:
        with self._guard(path):
            if os.path.exists(path):
                raise _Conflict(path)
            return self._write(path, body)

    def read(self, path: str) -> tuple[bytes, str] | None:
        with self._guard(path):
            try:
                return Path(path).read_bytes(), self._etag(path)
            except FileNotFoundError:
                return None

    def replace(self, path: str, body: bytes, etag: str) -> str:
        with self._guard(path):
            if not os.path.exists(path) or self._etag(path) != etag:
                raise _Conflict(path)
            return self._write(path, body)

    def delete(self, path: str, etag: str) -> None:
        with self._guard(path):
            if os.path.exists(path) and self._etag(path) == etag:
                os.unlink(path)


def _backend(root: str) -> tuple[Any, str]:
    fs, path = fsspec.core.url_to_fs(root)
    protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    if "s3" in protocols or "s3a" in protocols:
        return _S3Leases(fs), path.rstrip("/")
    if "file" in protocols or "local" in protocols:
        return _LocalLeases(), str(Path(path).resolve())
    raise ValueError(f"lock root {root!r}: leases need S3 (conditional writes) or a local directory, not {protocols}")


def default_lock_root() -> str:
    """``<Prefect default result storage>/locks``: locks are shared exactly when results are."""
    from prefect.results import get_default_result_storage

    storage = get_default_result_storage(_sync=True)
    basepath = getattr(storage, "basepath", None)
    if not basepath:
        raise RuntimeError(f"result storage {type(storage).__name__} has no basepath to keep lock leases in")
    return f"{str(basepath).rstrip('/')}/locks"


# ------------------------------------------------------------------------------------ manager
@dataclass
class _Held:
    path: str
    holder: str
    etag: str
    lost: bool = False


class LeaseLockManager:
    """Prefect ``LockManager`` whose locks are leases that expire unless their holder renews them.

    Args:
        root: fsspec URL of the lease directory (``s3://bucket/prefix/locks`` or a local path);
            None resolves ``<default result storage>/locks`` on first use.
        lease: lease in seconds; None reads ``QUANTDAG_LOCK_LEASE_SECONDS`` on every acquire.
        poll: seconds between attempts while another holder has the lease.
    """

    def __init__(self, root: str | None = None, lease: float | None = None, poll: float = 0.5) -> None:
        self._root = root
        self._lease = lease
        self.poll = poll
        self._held: dict[str, _Held] = {}
        self._guard = threading.Lock()
        self._renewing = threading.Lock()  # one lease write at a time: a renewal or a release
        self._heartbeat: threading.Thread | None = None
        self._backends: dict[str, tuple[Any, str]] = {}

    def __deepcopy__(self, memo: dict[int, Any]) -> LeaseLockManager:
        return self  # Prefect copies cache policies; the held leases must stay in one place

    def __reduce__(self) -> tuple[Any, ...]:
        return (LeaseLockManager, (self._root, self._lease, self.poll))

    # ----------------------------------------------------------------------------- internals
    @property
    def lease(self) -> float:
        return self._lease if self._lease is not None else lease_seconds()

    def _where(self, key: str) -> tuple[Any, str]:
        root = self._root or default_lock_root()
        if root not in self._backends:
            self._backends[root] = _backend(root)
        backend, base = self._backends[root]
        return backend, f"{base}/{key}.lease"

    def _body(self, key: str, holder: str) -> bytes:
        owner = f"{socket.gethostname()}:{os.getpid()}"
        return json.dumps({"key": key, "holder": holder, "owner": owner, "expires": time.time() + self.lease}).encode()

    @staticmethod
    def _parse(raw: bytes) -> dict[str, Any]:
        try:
            return json.loads(raw)
        except ValueError:
            return {"expires": 0.0}  # a torn or foreign object counts as expired

    def _start_heartbeat(self) -> None:
        if self._heartbeat is None or not self._heartbeat.is_alive():
            self._heartbeat = threading.Thread(target=self._renew_forever, name="quantdag-lease-heartbeat", daemon=True)
            self._heartbeat.start()

    def _renew_forever(self) -> None:
        while True:
            time.sleep(max(self.lease / 4, 0.2))
            with self._guard:
                held = dict(self._held)
            if not held:
                with self._guard:
                    if not self._held:
                        self._heartbeat = None
                        return
                continue
            for key, entry in held.items():
                backend, _ = self._where(key)
                with self._renewing:  # a release waits: it never deletes under a renewal, nor with a stale etag
                    with self._guard:
                        if entry.lost or self._held.get(key) is not entry:  # released since the snapshot
                            continue
                    try:
                        entry.etag = backend.replace(entry.path, self._body(key, entry.holder), entry.etag)
                    except _Conflict:
                        entry.lost = True
                        log.error("lease %s was taken over by another run: this holder stalled past its lease",
                                  entry.path)
                    except Exception as err:  # noqa: BLE001 - keep renewing; the next beat may succeed
                        log.warning("could not renew lease %s: %s", entry.path, err)

    # ----------------------------------------------------------------------------- protocol
    def acquire_lock(self, key: str, holder: str, acquire_timeout: float | None = None,
                     hold_timeout: float | None = None) -> bool:
        """Take the lease on ``key``; wait while a live holder renews it, take it over once expired.

        Args:
            key: the transaction key (a task's cache key).
            holder: who holds it (Prefect passes host, process and thread).
            acquire_timeout: seconds to wait; None waits as long as a live holder keeps renewing.
            hold_timeout: ignored: the lease expires by itself when its holder dies.

        Returns:
            True when acquired; False when ``acquire_timeout`` passed first.
        """
        backend, path = self._where(key)
        deadline = None if acquire_timeout is None else time.monotonic() + acquire_timeout
        waited = False
        while True:
            try:
                etag = backend.create(path, self._body(key, holder))
                return self._hold(key, path, holder, etag, waited)
            except _Conflict:
                pass
            current = backend.read(path)
            if current is not None:
                raw, etag = current
                lease = self._parse(raw)
                if lease.get("holder") == holder and key in self._held:
                    return True
                if lease.get("expires", 0.0) < time.time():
                    try:
                        etag = backend.replace(path, self._body(key, holder), etag)
                    except _Conflict:
                        continue
                    log.warning("took over expired lease %s from %s (expired %.0f s ago)", path,
                                lease.get("owner", "?"), time.time() - lease.get("expires", 0.0))
                    return self._hold(key, path, holder, etag, waited)
                if not waited:
                    log.info("step %s is being computed by %s; waiting for its lease", key, lease.get("owner", "?"))
                    waited = True
            if deadline is not None and time.monotonic() >= deadline:
                return False
            time.sleep(self.poll)

    def _hold(self, key: str, path: str, holder: str, etag: str, waited: bool) -> bool:
        with self._guard:
            self._held[key] = _Held(path, holder, etag)
            self._start_heartbeat()
        if waited:
            log.info("acquired lease %s after waiting", path)
        return True

    async def aacquire_lock(self, key: str, holder: str, acquire_timeout: float | None = None,
                            hold_timeout: float | None = None) -> bool:
        """Async :meth:`acquire_lock` (runs in a worker thread)."""
        return await asyncio.to_thread(self.acquire_lock, key, holder, acquire_timeout, hold_timeout)

    def release_lock(self, key: str, holder: str) -> None:
        """Delete the lease if this holder still owns it (a lease taken over is left alone).

        Raises:
            ValueError: ``holder`` does not hold the lock on ``key`` in this process.
        """
        with self._renewing:
            with self._guard:
                entry = self._held.get(key)
                if entry is None or entry.holder != holder:
                    raise ValueError(f"cannot release lock on {key!r}: not held by {holder!r}")
                del self._held[key]
            backend, _ = self._where(key)
            if entry.lost:
                log.warning("not deleting lease %s: another run took it over", entry.path)
                return
            backend.delete(entry.path, entry.etag)

    def is_locked(self, key: str) -> bool:
        """True while some holder's lease on ``key`` has not expired."""
        backend, path = self._where(key)
        current = backend.read(path)
        return current is not None and self._parse(current[0]).get("expires", 0.0) >= time.time()

    def is_lock_holder(self, key: str, holder: str) -> bool:
        """True when ``holder`` holds ``key`` through this manager and has not lost the lease."""
        with self._guard:
            entry = self._held.get(key)
        return entry is not None and entry.holder == holder and not entry.lost

    def wait_for_lock(self, key: str, timeout: float | None = None) -> bool:
        """Wait until ``key`` is free (released or expired); False when ``timeout`` passed first."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.is_locked(key):
            if deadline is not None and time.monotonic() >= deadline:
                return False
            time.sleep(self.poll)
        return True

    async def await_for_lock(self, key: str, timeout: float | None = None) -> bool:
        """Async :meth:`wait_for_lock`."""
        return await asyncio.to_thread(self.wait_for_lock, key, timeout)


# ------------------------------------------------------------------------------------ GPU slots
def gpu_limit_names(env: dict[str, str] | None = None) -> list[str]:
    """Global concurrency limits for the GPUs this process sees: ``gpu-<index>`` per visible GPU.

    ``CUDA_VISIBLE_DEVICES=0,1`` -> ``["gpu-0", "gpu-1"]``; unset or empty -> ``[]`` (no slot is
    taken). ``QUANTDAG_GPU_LIMIT_PREFIX`` replaces ``gpu`` (e.g. ``gpu-node7`` when several hosts
    share one Prefect server).

    Args:
        env: the environment to read both variables from; None reads this process's.

    Raises:
        SettingsError: a ``QUANTDAG_*`` variable of ``env`` has a bad value (:mod:`conf.settings`).
    """
    knobs = settings() if env is None else Settings.from_env(env)
    env = os.environ if env is None else env
    devices = [d.strip() for d in env.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    return [f"{knobs.gpu_limit_prefix}-{device}" for device in devices if device != "-1"]


@dataclass(frozen=True)
class GpuSlot:
    """One GPU held through the slot of its global concurrency limit.

    Attributes:
        name: the limit, e.g. ``gpu-1``.
        ordinal: the GPU's index among ``CUDA_VISIBLE_DEVICES``, i.e. the torch device ordinal
            (``cuda:<ordinal>``); ``CUDA_VISIBLE_DEVICES=3`` holds ``gpu-3`` at ordinal 0.
    """

    name: str
    ordinal: int


_CURRENT_GPU: contextvars.ContextVar[GpuSlot | None] = contextvars.ContextVar("quantdag_current_gpu", default=None)


def current_gpu() -> GpuSlot | None:
    """The GPU that :func:`gpu_slots` holds in this context (thread or task), else None.

    None outside :func:`gpu_slots` and inside one that holds nothing (no GPU visible).
    """
    return _CURRENT_GPU.get()


def _create_hint(names: list[str], reason: object) -> str:
    commands = "; ".join(f"prefect gcl create {name} --limit 1" for name in names)
    return f"GPU concurrency limits {names} could not be taken ({reason}); create them: {commands}"


def missing_gpu_limits(names: list[str]) -> list[str]:
    """The names among ``names`` that have no global concurrency limit on the Prefect server."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    missing = []
    with get_client(sync_client=True) as client:
        for name in names:
            try:
                client.read_global_concurrency_limit_by_name(name)
            except ObjectNotFound:
                missing.append(name)
    return missing


def _is_busy(err: BaseException) -> bool:
    """True when an acquisition failed only because the limit has no free slot (HTTP 423)."""
    seen: BaseException | None = err
    while seen is not None:
        response = getattr(seen, "response", None)
        if getattr(response, "status_code", None) == 423:
            return True
        seen = seen.__cause__
    return False


class _QuietRefusedTries(logging.Filter):
    """Drops Prefect's ERROR record for an acquisition tried once (``max_retries=0``) and refused 423.

    Prefect's acquisition service logs every failed item at ERROR, a taken slot included, although
    the caller gets the exception and handles it; :func:`gpu_slots` tries taken GPUs on purpose.
    Any other record passes (also when Prefect changes the record's shape).
    """

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args if isinstance(record.args, tuple) else ()
        item = args[1] if len(args) == 2 and isinstance(args[1], tuple) else ()
        future = item[-1] if len(item) > 3 else None
        if item and item[3] == 0 and isinstance(future, concurrent.futures.Future) and future.done() \
                and not future.cancelled():
            err = future.exception()
            return err is None or not _is_busy(err)
        return True


_QUIET_REFUSED_TRIES = _QuietRefusedTries()


@contextlib.contextmanager
def gpu_slots(task_run_id: str | None = None, poll: float | None = None) -> Iterator[GpuSlot | None]:
    """Hold ONE free GPU: a slot of the first visible GPU's global concurrency limit that has one.

    Each visible GPU's limit (:func:`gpu_limit_names`, in ``CUDA_VISIBLE_DEVICES`` order) is
    tried once without waiting (one request with ``max_retries=0``: the server grants the slot or
    answers 423 Locked). When every one is taken, the round repeats every ``poll`` seconds until
    one frees, however long that takes. With one visible GPU this is a wait for that GPU's slot.
    The slot is taken with ``strict=True`` and leased (``QUANTDAG_GPU_LEASE_SECONDS``, default
    300, 60 to 86400 seconds) and renewed while this process lives, so a killed holder frees it
    when its lease runs out. While it is held, :func:`current_gpu` returns it.

    A single non-blocking request is used rather than Prefect's ``timeout_seconds``: that
    timeout cancels the request in flight, and a slot the server grants at that moment would
    stay taken, unknown to anyone, until its lease expires.

    Args:
        task_run_id: the Prefect task run recorded as the slot's holder (None records none).
        poll: seconds between rounds while every GPU is taken; None reads
            ``QUANTDAG_GPU_POLL_SECONDS`` (default 1).

    Yields:
        The :class:`GpuSlot` held; None when no GPU is visible (nothing is taken).

    Raises:
        RuntimeError: a visible GPU's limit does not exist, checked for all of them before any
            slot is taken (names the ``prefect gcl create ...`` command for each missing one),
            or an acquisition fails for another reason than a taken slot.
        SettingsError: a ``QUANTDAG_*`` variable has a bad value (:mod:`conf.settings`).
    """
    knobs = settings()
    names = gpu_limit_names()
    if not names:
        yield None
        return
    from prefect.client.schemas.objects import ConcurrencyLeaseHolder
    from prefect.concurrency._asyncio import ConcurrencySlotAcquisitionError
    from prefect.concurrency.sync import concurrency

    logging.getLogger("prefect._internal.concurrency").addFilter(_QUIET_REFUSED_TRIES)  # added once
    missing = missing_gpu_limits(names)
    if missing:
        raise RuntimeError(_create_hint(missing, "no such limit"))
    holder = ConcurrencyLeaseHolder(type="task_run", id=task_run_id) if task_run_id else None
    lease = knobs.gpu_lease_seconds
    poll = knobs.gpu_poll_seconds if poll is None else poll
    with contextlib.ExitStack() as stack:
        slot = None
        waiting_since = None
        while slot is None:
            for ordinal, name in enumerate(names):
                try:
                    stack.enter_context(concurrency(name, occupy=1, max_retries=0, strict=True,
                                                    lease_duration=lease, holder=holder))
                except ConcurrencySlotAcquisitionError as err:
                    if _is_busy(err):
                        continue
                    raise RuntimeError(_create_hint([name], err)) from err
                slot = GpuSlot(name, ordinal)
                break
            else:
                if waiting_since is None:
                    waiting_since = time.monotonic()
                    log.info("all GPU slots %s are taken; waiting for one to free", names)
                time.sleep(poll)
        if waiting_since is not None:
            log.info("took GPU slot %s after waiting %.0f s", slot.name, time.monotonic() - waiting_since)
        token = _CURRENT_GPU.set(slot)
        stack.callback(_CURRENT_GPU.reset, token)
        yield slot
