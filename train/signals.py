"""Stop requests for a training run: SIGTERM (preemption) and SIGINT (Ctrl-C).

The first SIGTERM or Ctrl-C asks the run to finish its current step, save a checkpoint and return; a
second Ctrl-C aborts the process at once (exit code 130) without saving (the previous checkpoint stays
valid: saves are atomic).

Python runs signal handlers only between bytecodes, so a Ctrl-C pressed during a long XLA compile would
wait for the compile to end. The handlers here therefore work through ``signal.set_wakeup_fd``: the
interpreter's C-level handler writes the signal number to a socket at once, and a watcher thread reacts
(sets the flag, prints the notice, or exits on the second Ctrl-C) while the main thread is still busy.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import threading
from types import FrameType, TracebackType

ABORT_EXIT_CODE = 130  # 128 + SIGINT, what a shell reports for a process killed by Ctrl-C
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def _say(text: str) -> None:
    """Write a line to stderr from any thread without taking Python's stream locks."""
    try:
        os.write(sys.stderr.fileno(), ("\n" + text + "\n").encode())
    except (OSError, ValueError):  # no usable stderr: the flag still works
        pass


class StopSignals:
    """Context manager: while active, SIGTERM / SIGINT set :attr:`requested` (the signal's name) instead
    of killing the process; a second SIGINT exits with :data:`ABORT_EXIT_CODE`.

    Installs nothing outside the main thread (Python allows signal handlers only there)."""

    def __init__(self) -> None:
        self.requested: str | None = None
        self._previous: dict[int, object] = {}
        self._previous_fd: int | None = None
        self._sockets: tuple[socket.socket, socket.socket] | None = None
        self._watcher: threading.Thread | None = None

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is not threading.main_thread():
            return self
        reader, writer = socket.socketpair()
        writer.setblocking(False)
        self._sockets = (reader, writer)
        self._previous_fd = signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._ignore)
        self._watcher = threading.Thread(target=self._watch, args=(reader,), name="stop-signals", daemon=True)
        self._watcher.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._sockets is None:
            return
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)  # type: ignore[arg-type]
        self._previous.clear()
        signal.set_wakeup_fd(self._previous_fd if self._previous_fd is not None else -1)
        reader, writer = self._sockets
        writer.close()  # the watcher reads end-of-file and returns
        if self._watcher is not None:
            self._watcher.join(timeout=5)
        reader.close()
        self._sockets = None

    @staticmethod
    def _ignore(signum: int, frame: FrameType | None) -> None:
        """The Python-level handler: the watcher thread does the work (it sees the signal sooner)."""

    def _watch(self, reader: socket.socket) -> None:
        while True:
            try:
                data = reader.recv(64)
            except OSError:
                return
            if not data:
                return
            for signum in data:
                self.on_signal(signum)

    def on_signal(self, signum: int) -> None:
        """React to one delivered signal (called by the watcher thread)."""
        if signum not in STOP_SIGNALS:
            return
        name = signal.Signals(signum).name
        if self.requested is not None:
            if signum == signal.SIGINT:
                _say(f"{name} again: aborting now without saving (the newest checkpoint stays valid)")
                os._exit(ABORT_EXIT_CODE)
            return
        self.requested = name
        _say(
            f"{name} received: finishing the current step, then saving a checkpoint and exiting "
            "(press Ctrl-C again to abort at once without saving)"
        )
