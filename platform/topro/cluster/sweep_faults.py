"""Fault injection for the sweep's resume tests (``tests/test_sweep_resume.py``): kill the driver at a named point.

``$TOPRO_TEST_KILL_SWEEP_DRIVER_AT=<point>`` SIGKILLs the sweep's driver process the first time the point
is reached: "report" (a trial's Train run registered a checkpoint, Tune has not yet seen its result),
"fit" (a trial's TorchTrainer is about to start), "evaluated" (the first checkpoint's evaluation is logged,
the others not yet), "registered" (a champion is registered, the report not yet).
"""
from __future__ import annotations

import logging
import os
import signal
import time

log = logging.getLogger(__name__)

KILL_DRIVER_ENV = "TOPRO_TEST_KILL_SWEEP_DRIVER_AT"
DRIVER_PID_ENV = "TOPRO_SWEEP_DRIVER_PID"


def note_driver_pid() -> None:
    """Record this process as the sweep's driver (a local Ray's workers inherit the variable)."""
    os.environ[DRIVER_PID_ENV] = str(os.getpid())


def kill_driver_if_asked(point: str) -> None:
    """SIGKILL the sweep's driver at ``point`` when ``$TOPRO_TEST_KILL_SWEEP_DRIVER_AT`` names it (tests)."""
    if os.environ.get(KILL_DRIVER_ENV) != point or not os.environ.get(DRIVER_PID_ENV):
        return
    log.warning("fault injection: killing the sweep driver (pid %s) at %r", os.environ[DRIVER_PID_ENV], point)
    os.kill(int(os.environ[DRIVER_PID_ENV]), signal.SIGKILL)
    time.sleep(5)  # this process goes down with Ray's; do not carry on meanwhile
