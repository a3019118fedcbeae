"""Training on Ray Train: a ``TorchTrainer`` whose workers run ``topro.train.train``.

``build_trainer`` makes the trainer (the sweep fits it inside a Tune driver
function); ``train_on_ray`` starts or joins Ray, fits, and returns the same
summary as ``topro.train.train`` with ``checkpoint`` pointing to a local copy
of the best model's consolidated export (``<output_dir>/checkpoint``).

Checkpoints: every English dev evaluation reports its metrics with a Ray
checkpoint named ``checkpoint-step<NNNNNN>`` in ``<storage_path>/<name>/``.
Each holds ``loop_state.json``, the model and optimizer state (DDP:
``training_state.pt``; DeepSpeed: ``state/`` with every rank's ZeRO shards)
and, when that evaluation improved the score, ``model/``: the consolidated
safetensors export. Ray keeps the best checkpoint and the latest one (plus
``keep_checkpoints - 1`` more of the best). A worker failure restarts the
worker group from the latest checkpoint (``max_failures`` times); a new
``fit`` with the same name and storage continues from it too.

SIGTERM/SIGINT on the driver (``train_on_ray``): the Ray Train run is aborted
(its workers abandon the step under way), the one line names the latest Ray
checkpoint and the command that resumes from it, and the exit status is
128 + the signal. Each rank's RNG streams and running loss are in every
checkpoint (``rank<N>_state.pt``), so the resumed run's English dev history is
the uninterrupted run's, to the digit (``tests/test_train_ray_sigterm.py``).

``metrics.json`` and the summary name where each rank ran: ``workers`` is a
list of ``{"rank", "node", "node_id", "pid"}`` (``node``: the Ray node's
name); ``placement_strategy: SPREAD`` puts workers on different nodes.

Metrics reported per evaluation: ``epoch``, ``step``, ``train_loss``,
``dev_<metric>``, ``dev_accuracy`` (``dev_viterbi_f1`` for span tasks),
``best_dev_<metric>``, ``best_step`` and ``is_best``. ``best_checkpoint_path``
finds the best export in a ``Result``.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import threading
import time
from pathlib import Path
from typing import Any

from topro import atomic
from topro.config import TrainConfig, from_dict, to_dict
from topro.cluster.strategies import AVERAGED_FLAG, BEST_FLAG, EXPORT_DIR, resolve_deepspeed_config_path

log = logging.getLogger(__name__)

FAULT_MARKER = "fault-injected.json"


def prepare_config(cfg: TrainConfig) -> TrainConfig:
    """The config as workers need it: absolute local paths, and a distributed strategy.

    Workers do not share the driver's working directory; ``strategy: local``
    with Ray means DDP (the default for several workers).
    """
    changes: dict[str, Any] = {"output_dir": str(Path(cfg.output_dir).expanduser().resolve())}
    if cfg.data_dir:
        changes["data_dir"] = str(Path(cfg.data_dir).expanduser().resolve())
    if Path(cfg.model).expanduser().is_dir():
        changes["model"] = str(Path(cfg.model).expanduser().resolve())
    if cfg.strategy == "local":
        changes["strategy"] = "ddp"
    if cfg.strategy == "deepspeed" or changes.get("strategy") == "deepspeed":
        changes["deepspeed_config"] = str(resolve_deepspeed_config_path(cfg.deepspeed_config or ""))
    return dataclasses.replace(cfg, **changes)


def run_location(cfg: TrainConfig, name: str | None = None, storage_path: str | None = None) -> tuple[str, str]:
    """(run name, storage path): defaults are the output folder's name and ``<output_dir>/ray``."""
    name = name or cfg.run_name or Path(cfg.output_dir).name
    storage = storage_path or cfg.storage_path or str(Path(cfg.output_dir) / "ray")
    if "://" not in storage:
        storage = str(Path(storage).expanduser().resolve())
    return name, storage


def build_trainer(cfg: TrainConfig, *, name: str | None = None, storage_path: str | None = None,
                  callbacks: list | None = None):
    """A ``TorchTrainer`` for ``cfg`` (not fitted). ``callbacks`` go to its ``RunConfig``."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from topro.cluster.loopback import LoopbackTorchConfig
    from topro.cluster.strategies import deepspeed_config

    cfg = prepare_config(cfg)
    name, storage = run_location(cfg, name, storage_path)
    loop_config = {
        "cfg": to_dict(cfg),
        # Read on the driver: worker nodes need not have the file.
        "deepspeed_config": deepspeed_config(cfg) if cfg.strategy == "deepspeed" else None,
        "fault_marker": f"{storage.rstrip('/')}/{name}/{FAULT_MARKER}" if cfg.fault_step is not None else None,
    }
    if cfg.strategy == "deepspeed" and loop_config["deepspeed_config"]:
        from topro.averaging import check_selection

        # Refused on the driver, before any worker starts (ZeRO-3 partitions the weights to average).
        check_selection(cfg, zero_stage=int(loop_config["deepspeed_config"].get("zero_optimization", {})
                                            .get("stage", 0)))
    resources = {"CPU": cfg.cpus_per_worker}
    if cfg.use_gpu:
        resources["GPU"] = 1
    scaling = ScalingConfig(num_workers=cfg.workers, use_gpu=cfg.use_gpu, resources_per_worker=resources,
                            placement_strategy=cfg.placement_strategy)
    run = RunConfig(
        name=name, storage_path=storage, callbacks=callbacks,
        failure_config=FailureConfig(max_failures=cfg.max_failures),
        # Score 1 for an evaluation that improved dev, 0 otherwise: Ray keeps the top-scoring checkpoints,
        # ties going to the later one, so its best is the last improvement, the loop's best (which holds
        # the export). Ranking by the dev score itself would keep the later of two equal scores instead.
        checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints, checkpoint_score_attribute=BEST_FLAG,
                                           checkpoint_score_order="max"),
    )
    return TorchTrainer(train_loop_per_worker, train_loop_config=loop_config, scaling_config=scaling,
                        run_config=run, torch_config=LoopbackTorchConfig())


def train_loop_per_worker(config: dict[str, Any]) -> dict[str, Any]:
    """One Ray Train worker: the foundation's loop with a DDP or DeepSpeed strategy, resumed if Ray has a checkpoint."""
    import ray.train
    import torch

    from topro.train import train

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import transformers

    transformers.utils.logging.disable_progress_bar()  # per-load bars flood the forwarded worker logs
    cfg = from_dict(TrainConfig, config["cfg"])
    cfg.progress = False  # tqdm's carriage returns garble the worker logs Ray forwards
    torch.set_num_threads(cfg.num_threads or max(1, int(cfg.cpus_per_worker)))
    strategy = worker_strategy(cfg, config)
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        summary = train(cfg, strategy)
    else:
        with checkpoint.as_directory() as folder:
            summary = train(cfg, strategy, resume_from=Path(folder))
    # Where each rank ran (the driver writes this into metrics.json and MLflow).
    return {**summary, "workers": strategy.workers}


def worker_strategy(cfg: TrainConfig, config: dict[str, Any]):
    """This worker's strategy: DeepSpeed with the driver's config, else DDP."""
    from topro.cluster.strategies import DDPStrategy, DeepSpeedStrategy

    if cfg.strategy == "deepspeed":
        return DeepSpeedStrategy(cfg, config["deepspeed_config"], fault_marker=config["fault_marker"])
    return DDPStrategy(cfg, fault_marker=config["fault_marker"])


def best_checkpoint_path(result) -> str | None:
    """Where the best model's consolidated export lies in a fitted run's storage (``None``: no evaluation).

    The path is on ``result.checkpoint.filesystem`` (a local folder for a local
    ``storage_path``) and loads with ``topro.methods.load_checkpoint``.
    """
    improved = [(ckpt, m) for ckpt, m in (result.best_checkpoints or []) if m.get(BEST_FLAG)]
    if not improved:
        return None
    # Improvements are strict, so the last one is the best; the averaged export (selection: average_*)
    # is reported after the last evaluation, at the same step, and wins the tie.
    checkpoint, _ = max(improved, key=lambda item: (item[1]["step"], item[1].get(AVERAGED_FLAG, 0.0)))
    return f"{checkpoint.path.rstrip('/')}/{EXPORT_DIR}"


def fault_injected_at(cfg: TrainConfig, name: str | None = None, storage_path: str | None = None) -> dict | None:
    """The fault injection record of a run (``{"step", "rank", "pid"}``), if a worker was killed."""
    import pyarrow.fs

    name, storage = run_location(prepare_config(cfg), name, storage_path)
    fs, path = pyarrow.fs.FileSystem.from_uri(f"{storage.rstrip('/')}/{name}/{FAULT_MARKER}")
    if fs.get_file_info(path).type == pyarrow.fs.FileType.NotFound:
        return None
    with fs.open_input_stream(path) as stream:
        return json.loads(stream.read().decode())


def copy_best_export(result, target: Path) -> str:
    """Copy the run's best export (its last improved checkpoint's ``model`` folder) to the local folder
    ``target``, replacing what is there; returns the export's path. Train rotates its checkpoints: the copy stays."""
    import pyarrow.fs

    export = best_checkpoint_path(result)
    if export is None:
        raise RuntimeError(f"run {result.path} reported no improved checkpoint")
    # Staged and published atomically (RUN/checkpoint -> checkpoint.vN), then checked against its record:
    # a copy cut short never replaces the previous export.
    with atomic.staged_folder(target, "checkpoint_export") as tmp:
        pyarrow.fs.copy_files(export, str(tmp), source_filesystem=result.checkpoint.filesystem,
                              destination_filesystem=pyarrow.fs.LocalFileSystem())
        from topro.checkpoint_files import verify_checkpoint

        verify_checkpoint(tmp)
    return export


def train_on_ray(cfg: TrainConfig, address: str | None = None) -> dict[str, Any]:
    """Start or join Ray, train, and return the summary (``checkpoint``: ``<output_dir>/checkpoint``)."""
    from topro.cluster.runtime import init_ray

    from topro.cluster.storage import check_storage

    import ray

    was_running = ray.is_initialized()
    init_ray(address)
    cfg = prepare_config(cfg)
    atomic.clean_leftovers(cfg.output_dir, names=("checkpoint",))  # of a driver killed while copying the export
    name, storage = run_location(cfg)
    # Every node must reach the checkpoints (a restarted worker may land anywhere): checked before training.
    check_storage(storage, "storage_path")
    if (Path(storage) / name / "checkpoint_manager_snapshot.json").is_file():
        log.warning("run %s already has checkpoints in %s: continuing from the latest (another output_dir or "
                    "run_name starts afresh)", name, storage)
    trainer = build_trainer(cfg)
    from topro.interrupts import StopRequests

    # SIGTERM/SIGINT: during fit, the Ray Train run is aborted (Interrupted says which checkpoint resumes);
    # after it, the export copy and metrics.json are finished first.
    with StopRequests() as stops:
        result = fit_or_stop(trainer, stops, cfg, name, storage, was_running)
        if result.error is not None:
            raise result.error
        summary = dict(result.return_value or {})
        local = Path(cfg.output_dir) / "checkpoint"
        export = copy_best_export(result, local)
        summary.update({"checkpoint": str(local), "ray_checkpoint": export, "ray_run": result.path,
                        "fault_injected": fault_injected_at(cfg)})
        atomic.write_json(Path(cfg.output_dir) / "metrics.json", summary, "metrics")
    log.info("best checkpoint %s (copied from %s)", local, export)
    if stops.requested:  # the signal came after training: the run is complete
        raise stops.interrupted(f"training finished ({cfg.output_dir}/metrics.json, {local}); eval_langs not "
                                f"evaluated: run topro evaluate --checkpoint {local}")
    return summary


# --- SIGTERM / SIGINT on the driver -------------------------------------------------------------------------

class RunAborter:
    """Aborts a Ray Train run from a thread (a signal handler may only start it): the controller stops its
    worker group and exits; one that has not within ``grace_s`` is killed (its workers die with it)."""

    def __init__(self, grace_s: float):
        self.grace_s = grace_s
        self.controller = None
        self.thread: threading.Thread | None = None
        self.seconds: float | None = None

    def start(self) -> None:
        if self.controller is not None and self.thread is None:
            self.thread = threading.Thread(target=self._abort, name="topro-abort-run", daemon=True)
            self.thread.start()

    def _abort(self) -> None:
        import ray

        start = time.monotonic()
        log.warning("stopping the Ray Train run: its workers abandon the step under way")
        try:
            ray.get(self.controller.abort.remote(), timeout=self.grace_s)
        except ray.exceptions.GetTimeoutError:
            log.warning("the Ray Train controller did not stop within shutdown_grace_s=%g: killing it", self.grace_s)
            ray.kill(self.controller)
        except ray.exceptions.RayActorError:
            pass  # abort ends the controller's process: the expected answer
        self.seconds = time.monotonic() - start

    def wait(self) -> float:
        if self.thread is not None:
            self.thread.join(self.grace_s + 10)
        return self.seconds or 0.0


def fit_or_stop(trainer, stops, cfg: TrainConfig, name: str, storage: str, was_running: bool = True):
    """``trainer.fit()``; on SIGTERM/SIGINT during it the Ray Train run is aborted (the workers abandon the step
    under way; the latest Ray checkpoint is what a rerun of the same command continues from) and
    ``Interrupted`` is raised, saying which step that is. A fit that finished anyway returns its result.
    ``was_running``: whether Ray ran before this command (if not, it is stopped before the one line)."""
    from topro.cluster.runtime import stop_ray_started_here

    aborter = RunAborter(cfg.shutdown_grace_s)

    def keep_controller(controller) -> None:
        aborter.controller = controller
        if stops.requested:  # the signal came before the controller existed
            aborter.start()

    if hasattr(trainer, "_register_sigint_handler"):
        # Ray Train (v2) would replace our SIGINT handler with its own (abort, then a RayActorError traceback)
        # and leave SIGTERM to Ray's sys.exit(15): we keep its controller and abort it on either signal.
        trainer._register_sigint_handler = keep_controller
    stops.on_first_signal = aborter.start
    try:
        return trainer.fit()
    except Exception:
        if not stops.requested:
            raise
        seconds = aborter.wait()
        message = stopped_run_message(cfg, name, storage, stops.elapsed(), seconds)
        # A Ray started here is stopped first: its forwarded worker log lines would follow the one line.
        stop_ray_started_here(was_running)
        raise stops.interrupted(message) from None
    finally:
        stops.on_first_signal = None  # after fit: a signal only sets the flag


def latest_ray_checkpoint(name: str, storage: str) -> tuple[str, int | None] | None:
    """(path, step) of the latest checkpoint Ray Train registered for run ``name`` (what a new ``fit``
    continues from), from its checkpoint manager's snapshot; ``None`` before the first."""
    import pyarrow.fs

    run = f"{storage.rstrip('/')}/{name}"
    fs, path = pyarrow.fs.FileSystem.from_uri(f"{run}/checkpoint_manager_snapshot.json")
    if fs.get_file_info(path).type == pyarrow.fs.FileType.NotFound:
        return None
    with fs.open_input_stream(path) as stream:
        latest = json.loads(stream.read().decode()).get("latest_checkpoint_result")
    if not latest:
        return None
    return f"{run}/{latest['checkpoint_dir_name']}", (latest.get("metrics") or {}).get("step")


def stopped_run_message(cfg: TrainConfig, name: str, storage: str, elapsed: float, abort_seconds: float) -> str:
    """The one line after a stop: what was kept and the command that resumes."""
    from topro.interrupts import resume_command

    late = f", later than shutdown_grace_s={cfg.shutdown_grace_s:g}" if elapsed > cfg.shutdown_grace_s else ""
    latest = latest_ray_checkpoint(name, storage)
    if latest is None:
        kept = ("no Ray checkpoint had been written yet (the first comes with the first English dev evaluation); "
                "rerunning the same command starts afresh")
    else:
        path, step = latest
        kept = (f"the latest Ray checkpoint is step {step} ({path}); steps after it are abandoned. Resume: rerun "
                f"the same command, it continues from that checkpoint")
    return (f"stopped the Ray Train run {name} (workers stopped in {abort_seconds:.1f} s{late}); {kept} "
            f"({resume_command()})")
