"""SIGTERM on ``topro train`` (local loop): a real subprocess and a real signal. It saves ``RUN/state``, says
so in one line and exits 143; rerunning the same command continues and reaches the same English dev history,
to the digit, as an uninterrupted run. Also: two ``topro train`` on one output folder."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# `topro train`, with each optimizer step announced on stdout and slowed by STEP_SLEEP seconds (so a test can
# signal in the middle of a run): the loop itself is unchanged.
SCRIPT = """
import os, sys, time
from topro import train
def announce(self, step):
    print(f"STEP {step}", flush=True)
    time.sleep(float(os.environ.get("STEP_SLEEP", "0")))
train.LocalStrategy.after_step = announce
from topro.cli import main
sys.exit(main(sys.argv[1:]))
"""


def train_command(out: Path, data_dir, *extra: str) -> list[str]:
    # Dropout is on (BERT's 0.1) and the run crosses an epoch: the RNG and the loop position must both resume.
    return [sys.executable, "-c", SCRIPT, "train", "--config", "configs/train/udpos-vanilla.yaml", "--data-dir",
            str(data_dir), "--output", str(out), "max_train_sentences=48", "max_dev_sentences=16", "epochs=2",
            "batch_size=4", "grad_accum=2", "eval_every_steps=4", "eval_langs=[]", "progress=false",
            "num_threads=1", *extra]


def env(sleep: float = 0.0) -> dict[str, str]:
    return {**os.environ, "STEP_SLEEP": str(sleep), "OMP_NUM_THREADS": "1",
            "PYTHONPATH": f"{REPO / 'platform'}{os.pathsep}{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}


def start(out: Path, data_dir, sleep: float, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(train_command(out, data_dir, *extra), cwd=REPO, env=env(sleep), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def wait_for_step(proc: subprocess.Popen, step: int, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    for line in proc.stdout:
        if line.strip() == f"STEP {step}":
            return
        assert time.monotonic() < deadline, f"no STEP {step} within {timeout}s"
    raise AssertionError(f"the run ended before step {step}: {proc.stderr.read()[-2000:]}")


def run(out: Path, data_dir, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(train_command(out, data_dir, *extra), cwd=REPO, env=env(), capture_output=True, text=True,
                          timeout=600)


@pytest.mark.slow
def test_sigterm_saves_a_state_and_the_rerun_reaches_the_same_history(tmp_path, data_dir, tiny_udpos):
    reference = run(tmp_path / "uninterrupted", data_dir)
    assert reference.returncode == 0, reference.stderr[-3000:]
    expected = json.loads((tmp_path / "uninterrupted" / "metrics.json").read_text())

    out = tmp_path / "interrupted"
    proc = start(out, data_dir, 0.3)
    wait_for_step(proc, 5)  # mid-epoch, after the evaluation of step 4, during step 6's micro-batches
    proc.send_signal(signal.SIGTERM)
    rest, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("topro train: SIGTERM: stopped at step ") and "saved the resumable state" in last
    assert f"{out}/state" in last and "rerun the same command" in last
    stopped_at = int(last.split("stopped at step ")[1].split()[0])
    assert 5 <= stopped_at < expected["steps"]
    assert (out / "state").is_symlink() and (out / "state" / "rng_state.pt").is_file()
    assert (out / "checkpoint").is_symlink() and not (out / "metrics.json").exists()

    resumed = run(out, data_dir)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    got = json.loads((out / "metrics.json").read_text())
    assert got["resumed_from_step"] == stopped_at
    assert got["history"] == expected["history"]  # every English dev score and train loss, to the digit
    assert got["best_step"] == expected["best_step"] and got["steps"] == expected["steps"]
    assert not (out / "state").exists() and not list(out.glob("state.v*"))  # finished: nothing to resume
    a, b = (p / "checkpoint" / "model.safetensors" for p in (tmp_path / "uninterrupted", out))
    assert a.read_bytes() == b.read_bytes()


@pytest.mark.slow
def test_a_second_train_on_the_same_output_is_refused_naming_the_first(tmp_path, data_dir, tiny_udpos):
    out = tmp_path / "run"
    first = start(out, data_dir, 30)  # holds the folder while the second starts
    try:
        wait_for_step(first, 1)
        second = run(out, data_dir)
        assert second.returncode == 2
        line = second.stderr.strip().splitlines()[-1]
        assert line.startswith(f"topro train: error: {out} is in use by another topro train: pid {first.pid} on host")
    finally:
        first.kill()
        first.communicate()
    # The first was SIGKILLed (no state saved: no signal handler ran): its lock is stale, the next run takes over.
    third = run(out, data_dir, "max_train_sentences=8", "epochs=1")
    assert third.returncode == 0, third.stderr[-2000:]
    assert not (out / ".topro.lock").exists()
