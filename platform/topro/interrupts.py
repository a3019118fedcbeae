"""SIGTERM and SIGINT as a stop request that long-running commands check at safe points (Ray-free).

Kubernetes (preemption, node drain), ``timeout``, systemd and most schedulers send SIGTERM and then,
after a grace period, SIGKILL. ``StopRequests`` turns the first SIGTERM/SIGINT into a flag that the
training loop (or ``topro evaluate``) checks between steps; it then saves what resumes the work and
raises ``Interrupted``, whose message is the one line the command prints, and whose ``exit_code`` is
128 + the signal (what a shell reports for a process killed by it). A second signal stops at once.
"""
from __future__ import annotations

import logging
import signal
import threading
import time
from typing import Callable

log = logging.getLogger(__name__)

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(Exception):
    """Stopped by a signal after saving what resumes the work; ``str()`` says what was kept."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class StopRequests:
    """While active (a ``with`` block in the main thread), the first SIGINT/SIGTERM sets ``signum`` and
    ``since``; a second one restores the previous handler and re-sends itself (an immediate stop).

    ``on_first_signal``: also called at the first signal, for a command that does not check the flag (the
    Ray driver waits inside ``trainer.fit()``). It runs inside the signal handler: it must only start work
    (a thread), not wait for it, and not raise (an exception raised into Ray's C++ wait is a SystemError)."""

    def __init__(self, on_first_signal: Callable[[], None] | None = None):
        self.signum: int | None = None
        self.since: float | None = None
        self.on_first_signal = on_first_signal
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:  # the second signal: stop now
            self.__exit__()
            signal.raise_signal(signum)
            return
        self.signum, self.since = signum, time.monotonic()
        if self.on_first_signal is not None:
            self.on_first_signal()
            return
        log.warning("%s received: finishing the current step, then saving a resumable state (a second signal "
                    "stops at once)", signal.Signals(signum).name)

    def elapsed(self) -> float:
        return time.monotonic() - self.since if self.since is not None else 0.0

    def __enter__(self) -> "StopRequests":
        global _active
        if threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.signal(sig, self._handle) for sig in SIGNALS}
            _active = self
        return self

    def __exit__(self, *exc) -> None:
        global _active
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}
        if _active is self:
            _active = NEVER

    def interrupted(self, message: str) -> Interrupted:
        name = signal.Signals(self.signum).name if self.signum else "signal"
        return Interrupted(self.signum or signal.SIGTERM, f"{name}: {message}")


class StopNow(Exception):
    """Raised by ``stop_point()`` inside a unit of work too long to finish after a signal (an LLM's language:
    minutes to hours on a CPU); the caller drops that unit and keeps those done."""


def stop_point() -> None:
    """Within long work: raise ``StopNow`` if the running command has been asked to stop."""
    if _active.requested:
        raise StopNow()


NEVER = StopRequests()
"""A request that never comes (no command is listening: signals act as they always do)."""
_active = NEVER


def active() -> StopRequests:
    """The stop requests of the command running now (``NEVER`` outside a ``StopRequests`` block)."""
    return _active


def resume_command() -> str:
    """The command line that started this process, as the user would type it again."""
    import shlex
    import sys

    argv = list(sys.argv)
    if argv and (argv[0].endswith(("topro", "__main__.py")) or argv[0] == "-m"):
        return "topro " + shlex.join(argv[1:])
    return shlex.join(argv)
