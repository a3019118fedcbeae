"""SIGTERM on the Ray driver of ``topro train --workers 2`` (DDP over gloo on a local Ray on 127.0.0.1, real data,
the tiny model): a real subprocess and a real signal after the first Ray checkpoint. The driver aborts the Ray
Train run, says in one line which checkpoint (step) is kept and how to resume, and exits 143; rerunning the same
command continues from that checkpoint and reaches the same English dev history, to the digit, as an
uninterrupted run (each rank's RNG streams and running loss are in the checkpoint: ``rank<N>_state.pt``).

Without ``rank<N>_state.pt`` (tried: its restore disabled) the history differed from the first evaluation after
the resume (step 5: dev accuracy 0.3841 against 0.3775, train loss 2.7007 against 2.6960): every rank restarted
its dropout stream from the seed, and rank 1 took rank 0's running loss from ``loop_state.json``. With it, the
DDP resume is bitwise: the same history and the same exported ``model.safetensors``."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from slowdown import slowed_env

REPO = Path(__file__).resolve().parent.parent

# Each optimizer step of the Ray Train workers takes 1.5 s more in the interrupted run (see slowdown.py), so that
# the signal lands mid-run.
SLOW_STEPS = "topro.cluster.strategies:RayWorker.after_step=1.5"

# Dropout is on (BERT's 0.1), checkpoints come mid-epoch (eval_every_steps=3 of 5 steps per epoch) and the run
# crosses epochs: each rank's random streams and running loss must resume, not just the weights.
SMALL = ["max_train_sentences=16", "max_dev_sentences=8", "epochs=2", "batch_size=4", "grad_accum=2",
         "max_length=32", "eval_every_steps=3", "eval_langs=[]", "progress=false", "num_threads=1"]


def command(out: Path, data_dir) -> list[str]:
    return [sys.executable, "-m", "topro.cli", "train", "--config", "configs/train/udpos-vanilla.yaml",
            "--data-dir", str(data_dir), "--output", str(out), "--workers", "2", "--strategy", "ddp", *SMALL]


def run(out: Path, data_dir, hooks: Path) -> subprocess.CompletedProcess:
    return subprocess.run(command(out, data_dir), cwd=REPO, env=slowed_env(hooks, None), capture_output=True,
                          text=True, timeout=900)


def latest_checkpoint_step(out: Path) -> int | None:
    snapshot = out / "ray" / out.name / "checkpoint_manager_snapshot.json"
    try:
        latest = json.loads(snapshot.read_text()).get("latest_checkpoint_result")
    except (OSError, ValueError):
        return None
    return latest["metrics"]["step"] if latest else None


@pytest.mark.slow
def test_sigterm_on_the_ray_driver_keeps_the_latest_checkpoint_and_the_rerun_reaches_the_same_history(
        tmp_path, data_dir, tiny_udpos):
    hooks = tmp_path / "hooks"
    reference = run(tmp_path / "uninterrupted", data_dir, hooks)
    assert reference.returncode == 0, reference.stderr[-3000:]
    expected = json.loads((tmp_path / "uninterrupted" / "metrics.json").read_text())
    # Steps per epoch follow the tiny tokenizer's lengths (5 with most builds; its trainer is not deterministic):
    # read, and the run must still checkpoint mid-epoch and cross the epoch boundary.
    per_epoch = expected["steps_per_epoch"]
    assert expected["steps"] == 2 * per_epoch and per_epoch > 3 and per_epoch % 3 != 0
    assert [h["step"] for h in expected["history"]] == sorted({*range(3, 2 * per_epoch + 1, 3), per_epoch,
                                                                2 * per_epoch})

    out = tmp_path / "interrupted"
    proc = subprocess.Popen(command(out, data_dir), cwd=REPO, env=slowed_env(hooks, SLOW_STEPS),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 600
    while latest_checkpoint_step(out) is None:  # the first checkpoint (step 3) is registered
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.monotonic() < deadline, "no Ray checkpoint within 600 s"
        time.sleep(0.2)
    signalled = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    stop_seconds = time.monotonic() - signalled
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    last = err.strip().splitlines()[-1]
    kept = latest_checkpoint_step(out)
    assert last.startswith(f"topro train: SIGTERM: stopped the Ray Train run {out.name} "), last
    assert f"the latest Ray checkpoint is step {kept} ({out}/ray/{out.name}/checkpoint-step{kept:06d})" in last
    assert "rerun the same command" in last and "--workers 2" in last
    # One line, no traceback wall after the signal (Ray's own start-up noise on a loaded machine comes before it).
    after = err[err.index("stopping the Ray Train run"):]
    assert "Traceback" not in after and "Error" not in after, after[-3000:]
    stopped_in = float(last.split("workers stopped in ")[1].split()[0])
    assert stopped_in < 20 and stop_seconds < 60  # shutdown_grace_s (default 20); the rest is Ray's and Python's exit
    print(f"SIGTERM to exit: {stop_seconds:.1f} s (workers stopped in {stopped_in:.1f} s); kept step {kept}")
    assert 3 <= kept < expected["steps"]
    assert not (out / "metrics.json").exists()

    resumed = run(out, data_dir, hooks)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    got = json.loads((out / "metrics.json").read_text())
    assert got["resumed_from_step"] == kept
    assert got["history"] == expected["history"]  # every English dev score and train loss, to the digit
    assert got["best_step"] == expected["best_step"] and got["steps"] == expected["steps"]
    a, b = (p / "checkpoint" / "model.safetensors" for p in (tmp_path / "uninterrupted", out))
    assert a.read_bytes() == b.read_bytes()


def test_a_stop_before_the_first_ray_checkpoint_says_the_rerun_starts_afresh(tmp_path):
    from topro.cluster.trainer import latest_ray_checkpoint, stopped_run_message
    from topro.config import TrainConfig

    cfg = TrainConfig(output_dir=str(tmp_path / "run"), shutdown_grace_s=5)
    storage = str(tmp_path / "run" / "ray")
    assert latest_ray_checkpoint("run", storage) is None
    line = stopped_run_message(cfg, "run", storage, elapsed=6.0, abort_seconds=1.2)
    assert line.startswith("stopped the Ray Train run run (workers stopped in 1.2 s, later than shutdown_grace_s=5); "
                           "no Ray checkpoint had been written yet"), line
    assert "rerunning the same command starts afresh" in line
