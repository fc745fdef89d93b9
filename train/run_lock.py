"""One run per directory: an exclusive lock file in the run directory.

``wuneng train`` / ``upcycle`` / ``experiment`` hold ``RUN_DIR/run.lock`` while they run. The lock is
an advisory ``flock`` on that file, which the operating system drops when the holding process ends in
any way (``kill -9`` included), so a lock left by a killed run is never mistaken for a live one: the
next run takes it over and says so. The file records who holds it (host, pid, command, start time) so
that a refused run can name the other process. The file itself stays (it is emptied on release):
deleting a lock file that another process may have just opened would let two runs hold it at once.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import Any

log = logging.getLogger(__name__)

LOCK_FILE = "run.lock"


class RunLockError(RuntimeError):
    """The run directory is in use by another process."""


def _describe(holder: dict[str, Any]) -> str:
    if not holder:
        return "a process that has not yet recorded its host and pid"
    since = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(holder.get("started", 0)))
    return f"pid {holder.get('pid')} on host {holder.get('host')} (`{holder.get('command', '?')}`, since {since})"


def _read_holder(fd: int) -> dict[str, Any]:
    os.lseek(fd, 0, os.SEEK_SET)
    text = os.read(fd, 1 << 16).decode(errors="replace").strip()
    if not text:
        return {}
    try:
        holder = json.loads(text)
    except json.JSONDecodeError:
        return {"pid": "?", "host": "?", "command": text[:80]}
    return holder if isinstance(holder, dict) else {}


def _write_holder(fd: int, holder: dict[str, Any]) -> None:
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
    os.fsync(fd)


class RunLock:
    """``with RunLock(run_dir, "wuneng train"):`` holds ``run_dir/run.lock`` (creating ``run_dir``) or
    raises :class:`RunLockError` naming the process that holds it. ``took_over`` describes the killed
    run whose stale lock was taken over (None when the lock was free)."""

    def __init__(self, run_dir: str | Path, command: str | None = None):
        self.path = Path(run_dir) / LOCK_FILE
        self.command = command or " ".join(["wuneng", *sys.argv[1:]])[:200]
        self.took_over: str | None = None
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise RunLockError(
                f"{self.path.parent} is in use by another run: {_describe(holder)}; wait for it to finish or "
                f"stop it, or choose another run directory"
            ) from None
        except OSError as e:  # a file system without locks (some network / FUSE mounts)
            os.close(fd)
            log.warning(
                "%s: cannot lock (%s); a second run into this directory would not be detected", self.path, e
            )
            return self
        previous = _read_holder(fd)
        if previous:
            self.took_over = _describe(previous)
            log.warning(
                "%s: taking over the lock of a run that ended without releasing it: %s",
                self.path,
                self.took_over,
            )
        _write_holder(
            fd,
            {
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "command": self.command,
                "started": time.time(),
            },
        )
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            os.ftruncate(fd, 0)
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()


@contextlib.contextmanager
def locked_run_dir(run_dir: str | Path, command: str | None = None) -> Iterator[RunLock | None]:
    """Hold ``run_dir``'s lock on process 0 for the duration; with several processes, every process
    raises :class:`RunLockError` together when process 0 cannot take it (nobody waits in a collective)."""
    import jax

    lock = RunLock(run_dir, command) if jax.process_index() == 0 else None
    error: RunLockError | None = None
    if lock is not None:
        try:
            lock.acquire()
        except RunLockError as e:
            error = e
    if jax.process_count() > 1:
        import numpy as np
        from jax.experimental import multihost_utils

        refused = np.max(multihost_utils.process_allgather(np.int32(error is not None)))
        if refused and error is None:
            error = RunLockError(f"{run_dir} is in use by another run (process 0's error names it)")
    if error is not None:
        raise error
    try:
        yield lock
    finally:
        if lock is not None:
            lock.release()
