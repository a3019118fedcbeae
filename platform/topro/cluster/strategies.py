"""Strategies for the training loop inside Ray Train workers: DDP and DeepSpeed.

Both implement ``topro.strategy.Strategy``: ``topro.train.LocalStrategy``'s steps with ``RayWorker``
beside them (no chain of subclasses), so the per-worker loop is ``topro.train.train`` unchanged. What
they add:

- ranks, and averaging over workers (``average``);
- the wrapper (DDP, a DeepSpeed engine) and its accumulation and step;
- at every English dev evaluation, a Ray Train checkpoint reported with the
  metrics through ``ray.train.report``: each rank writes its part into its own
  temporary folder (DDP: rank 0 writes model, optimizer and scheduler state;
  DeepSpeed: every rank writes its ZeRO shards) and Ray merges them into one
  checkpoint folder in the run's storage; every rank adds ``rank<N>_state.pt``,
  its RNG streams and running loss, so a resumed run continues exactly. When the score improved, rank 0
  also writes the consolidated export (safetensors + tokenizer + topro.json,
  what ``topro evaluate`` and serving load) into its ``model/`` subfolder;
- saving and resuming from such a checkpoint (``save_state``, ``load_state``);
- fault injection for tests (``fault_step``).

``deepspeed_config`` turns a JSON/YAML file (``cluster/deepspeed/`` ships ZeRO 0 to 3) into
the dict DeepSpeed gets, filling its ``auto`` values from the ``TrainConfig``.
"""
from __future__ import annotations

import json
import logging
import os
import pickle
import re
import shutil
import signal
import tempfile
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

from topro.config import ConfigError, TrainConfig, read_yaml
from topro.data import get_task
from topro.metrics import resolve_selection_metric
from topro.train import LocalStrategy, LoopState, MethodModule, rng_states, set_rng_states

log = logging.getLogger(__name__)

EXPORT_DIR = "model"
"""Subfolder of a Ray checkpoint holding the consolidated export (only in checkpoints that improved dev)."""
BEST_FLAG = "is_best"
AVERAGED_FLAG = "is_averaged"
"""Reported metric: 1.0 on the checkpoint holding the averaged weights of ``selection: average_*``."""
"""Reported metric: 1.0 when this evaluation improved the best English dev score, else 0.0."""
DEEPSPEED_TAG = "state"
"""DeepSpeed checkpoint tag inside each Ray checkpoint (one state per Ray checkpoint)."""
PACKAGED_DEEPSPEED_CONFIGS = Path(__file__).resolve().parent / "deepspeed"
"""The DeepSpeed configs shipped with topro (package data; ``configs/deepspeed/`` links to them)."""


def checkpoint_dir_name(step: int) -> str:
    return f"checkpoint-step{step:06d}"


def rank_state_file(rank: int) -> str:
    return f"rank{rank}_state.pt"


class RayWorker:
    """Ray's part of a strategy inside a Ray Train worker, beside ``LocalStrategy``'s steps (``class
    DDPStrategy(RayWorker, LocalStrategy)``): ranks, reporting, checkpoints, faults."""

    resumable = False  # resumes from Ray Train checkpoints, not output_dir/state

    def __init__(self, cfg: TrainConfig, fault_marker: str | None = None):
        import ray.train.torch

        super().__init__(cfg)
        context = ray.train.get_context()
        self.rank = context.get_world_rank()
        self.world_size = context.get_world_size()
        self.device = ray.train.torch.get_device()
        self.metric = resolve_selection_metric(get_task(cfg.task), cfg.selection_metric)
        self.fault_marker = fault_marker
        self.workers = self._gather_workers()

    def _gather_workers(self) -> list[dict[str, Any]]:
        """Every rank's node (name and id) and pid, gathered over the process group Ray Train set up."""
        import ray

        from topro.cluster.runtime import node_name

        mine = {"rank": self.rank, "node": node_name(), "node_id": ray.get_runtime_context().get_node_id(),
                "pid": os.getpid()}
        if self.world_size == 1 or not torch.distributed.is_initialized():
            return [mine]
        everyone: list[Any] = [None] * self.world_size
        torch.distributed.all_gather_object(everyone, mine)
        if self.rank == 0:
            log.info("workers: %s", ", ".join(f"rank {w['rank']} on {w['node']} (pid {w['pid']})" for w in everyone))
        return sorted(everyone, key=lambda w: w["rank"])

    def fault_rank(self) -> int:
        """The rank that ``fault_step`` kills: the first on node ``fault_node``, else rank 1 (or the only one)."""
        if self.cfg.fault_node:
            on_node = [w["rank"] for w in self.workers if w["node"] == self.cfg.fault_node]
            if not on_node:
                raise RuntimeError(f"fault_node {self.cfg.fault_node!r}: no worker runs there "
                                   f"(workers on {sorted({w['node'] for w in self.workers})})")
            return on_node[0]
        return min(1, self.world_size - 1)

    @property
    def export_dir(self) -> Path | None:
        return None  # the export lives in a Ray checkpoint; the driver resolves and copies it

    @property
    def module(self) -> MethodModule:
        return self.wrapped.module  # inside the DDP wrapper or the DeepSpeed engine

    def average(self, value: float) -> float:
        tensor = torch.tensor([float(value)], dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(tensor)
        return tensor.item() / self.world_size

    def checkpoint(self, state: LoopState, record: dict[str, Any], *, improved: bool, averaged: bool = False) -> None:
        """Checkpoint (every rank its part) and report the evaluation's metrics to Ray Train; an averaged
        checkpoint (``selection: average_*``) comes flagged best and averaged: its export wins."""
        import ray.train

        folder = Path(tempfile.mkdtemp(prefix="topro-checkpoint-"))
        try:
            self.save_state(folder)
            self.save_rank_state(folder, state)
            if improved:
                self.save_model(folder / EXPORT_DIR)
            if self.is_main:
                state.save(folder)
            metrics = {**record, f"best_dev_{self.metric}": state.best_metric, "best_step": state.best_step,
                       BEST_FLAG: float(improved), AVERAGED_FLAG: float(averaged)}
            name = checkpoint_dir_name(state.step) + ("-averaged" if averaged else "")
            # Ranks with nothing to write report no checkpoint; Ray merges the others' folders.
            checkpoint = ray.train.Checkpoint.from_directory(str(folder)) if any(folder.iterdir()) else None
            ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=name)
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def save_rank_state(self, folder: Path, state: LoopState) -> None:
        """What only this rank knows, as ``rank<N>_state.pt``: its RNG streams (dropout draws differ by rank)
        and its running loss of the epoch, so that a resumed run continues exactly as an uninterrupted one."""
        torch.save({"rng": rng_states(), "epoch_loss_sum": state.epoch_loss_sum,
                    "epoch_loss_count": state.epoch_loss_count}, folder / rank_state_file(self.rank))

    def restore_rank_state(self, folder: Path, state: LoopState) -> None:
        path = folder / rank_state_file(self.rank)
        if not path.is_file():  # a checkpoint of an older topro: the streams restart from the seed
            log.warning("%s has no %s: this rank's random streams restart from the seed", folder, path.name)
            return
        saved = torch.load(path, weights_only=True)
        set_rng_states(saved["rng"])
        state.epoch_loss_sum, state.epoch_loss_count = saved["epoch_loss_sum"], saved["epoch_loss_count"]

    def after_step(self, step: int) -> None:
        """Fault injection: at ``fault_step`` the rank-1 (or only, or ``fault_node``'s) worker kills itself, once per run.

        A marker in the run's storage remembers that the fault happened, so the
        worker group restarted by Ray (which replays steps after the last
        checkpoint) does not kill itself again. Before dying, the worker waits
        until Ray's controller has registered every checkpoint reported so far:
        the controller collects reports by polling workers (every 2 s), and a
        report still unread when a worker dies is lost, so a real crash right
        after a report resumes from the checkpoint before it. Waiting makes the
        test deterministic: it resumes from the latest checkpoint.
        """
        cfg = self.cfg
        if cfg.fault_step is None or step != cfg.fault_step or self.fault_marker is None:
            return
        if self.rank != self.fault_rank():
            return
        import pyarrow.fs
        import ray.train

        fs, path = pyarrow.fs.FileSystem.from_uri(self.fault_marker)
        if fs.get_file_info(path).type != pyarrow.fs.FileType.NotFound:
            return
        fs.create_dir(os.path.dirname(path), recursive=True)
        with fs.open_output_stream(path) as out:
            node = self.workers[self.rank]["node"]
            out.write(json.dumps({"step": step, "rank": self.rank, "pid": os.getpid(), "node": node}).encode())
        ray.train.get_all_reported_checkpoints()
        log.warning("fault injection: killing worker rank %d (pid %d) on node %s at step %d", self.rank, os.getpid(),
                    node, step)
        for handler in logging.getLogger().handlers:
            handler.flush()
        os.kill(os.getpid(), signal.SIGKILL)


class DDPStrategy(RayWorker, LocalStrategy):
    """PyTorch DistributedDataParallel over the process group Ray Train set up (gloo on CPU, NCCL on GPU)."""

    def wrap(self, module, optimizer, scheduler):
        from torch.nn.parallel import DistributedDataParallel

        module.to(self.device)
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        self.wrapped = DistributedDataParallel(module, device_ids=device_ids)
        self.optimizer, self.scheduler = optimizer, scheduler
        return self.wrapped

    def accumulating(self, boundary: bool):
        # Off accumulation boundaries gradients only accumulate locally; the boundary's backward all-reduces.
        return nullcontext() if boundary else self.wrapped.no_sync()

    def save_state(self, folder: Path) -> None:
        if self.is_main:  # replicas are identical after every step
            super().save_state(folder)


class DeepSpeedStrategy(RayWorker, LocalStrategy):
    """DeepSpeed ZeRO (stages 0-3) with the loop's torch AdamW and linear schedule."""

    def __init__(self, cfg: TrainConfig, ds_config: dict[str, Any], fault_marker: str | None = None):
        super().__init__(cfg, fault_marker)
        self.ds_config = ds_config
        self.zero_stage = int(ds_config.get("zero_optimization", {}).get("stage", 0))

    def wrap(self, module, optimizer, scheduler):
        import deepspeed

        module.to(self.device)
        if self.zero_stage == 3:
            # ToPro reads the tied output-embedding weights directly (label rows only), outside any
            # submodule's forward; ZeRO-3 must gather them for the whole loss forward.
            for param in _direct_access_parameters(module.model):
                deepspeed.zero.register_external_parameter(module, param)
        engine, _, _, _ = deepspeed.initialize(model=module, optimizer=optimizer, lr_scheduler=scheduler,
                                               config=self.ds_config, dist_init_required=False)
        self.wrapped, self.optimizer, self.scheduler = engine, engine.optimizer, engine.lr_scheduler
        return engine

    def backward_and_step(self, loss: torch.Tensor, boundary: bool) -> None:
        engine = self.wrapped
        engine.set_gradient_accumulation_boundary(boundary)
        engine.backward(loss)  # scales by 1/gradient_accumulation_steps itself
        # DeepSpeed counts micro-steps in step(): off a boundary it updates nothing; at one it clips,
        # steps the optimizer and the schedule, and zeroes the gradients.
        engine.step()

    def evaluation(self):
        if self.zero_stage != 3:
            return super().evaluation()
        # ZeRO-3 gathers a parameter only inside a forward that owns it (or registered it, see wrap):
        # predict through the engine, so the label scores run inside MethodModule.forward.
        return ScoresThroughModule(self.module.method), self.wrapped

    def save_model(self, folder: Path) -> None:
        gathered = nullcontext()
        if self.zero_stage == 3:  # every rank takes part in gathering the partitioned parameters
            import deepspeed

            gathered = deepspeed.zero.GatheredParameters(list(self.module.parameters()), modifier_rank=None)
        with gathered:
            super().save_model(folder)

    def save_state(self, folder: Path) -> None:
        # Every rank must call it: each writes its own ZeRO shards (rank 0 also the module states).
        self.wrapped.save_checkpoint(str(folder), tag=DEEPSPEED_TAG)

    def load_state(self, folder: Path) -> None:
        load_deepspeed_state(self.wrapped, folder)


def deepspeed_safe_globals() -> list:
    """The non-tensor types DeepSpeed (0.19) pickles into its checkpoints, allowed on a ``weights_only`` load."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address]


def load_deepspeed_state(engine, folder: Path) -> None:
    """``engine.load_checkpoint`` with every file read by ``torch.load(weights_only=True)``.

    DeepSpeed itself loads with ``weights_only=False``, i.e. runs whatever a pickle in the checkpoint says:
    anyone who can write the run's storage could run code on every worker. Here only tensors, plain
    containers and ``deepspeed_safe_globals()`` are accepted; anything else fails the resume with torch's
    ``UnpicklingError`` naming the refused global.
    """
    from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine

    allowed = deepspeed_safe_globals()

    class WeightsOnlyCheckpointEngine(TorchCheckpointEngine):
        def load(self, path: str, map_location=None):
            try:
                with torch.serialization.safe_globals(allowed):
                    return torch.load(path, map_location=map_location, weights_only=True)
            except pickle.UnpicklingError as err:
                found = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
                what = f"a pickled {found.group(1)!r}" if found else "a pickled object"
                raise pickle.UnpicklingError(
                    f"{path}: refusing to resume: it holds {what}, not tensors or DeepSpeed's own state; the "
                    "checkpoint may have been tampered with (remove it, or resume from another one)") from None

    previous = engine.checkpoint_engine
    engine.checkpoint_engine = WeightsOnlyCheckpointEngine()
    try:
        path, _ = engine.load_checkpoint(str(folder), tag=DEEPSPEED_TAG, load_optimizer_states=True,
                                         load_lr_scheduler_states=True)
    finally:
        engine.checkpoint_engine = previous
    if path is None:
        raise FileNotFoundError(f"{folder}: no DeepSpeed checkpoint with tag {DEEPSPEED_TAG!r}")


class ScoresThroughModule:
    """A method whose ``label_log_probs(module, batch)`` calls ``module(batch, output="scores")`` (a
    ``MethodModule`` or an engine wrapping one); everything else is the wrapped method's."""

    def __init__(self, method):
        self.method = method

    def __getattr__(self, name: str):
        return getattr(self.method, name)

    def label_log_probs(self, module, batch):
        return module(batch, output="scores")


def _direct_access_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """Parameters a method reads outside their module's forward (the MLM decoder and its bias)."""
    params = []
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None:
        params += list(head.parameters())
    for name, param in model.named_parameters():
        if name.endswith("predictions.bias") or name.endswith("lm_head.bias"):
            params.append(param)
    unique = {id(p): p for p in params}
    return list(unique.values())


# --- DeepSpeed configs --------------------------------------------------------------------------

def resolve_deepspeed_config_path(value: str) -> Path:
    """A DeepSpeed config file: an absolute path; a path relative to the working directory; or one shipped
    with topro, named bare (``zero3``) or as in the repository (``configs/deepspeed/zero3.yaml``), found
    in the installed package wherever topro runs from."""
    path = Path(value).expanduser()
    if path.is_absolute():
        candidates = [path]
    else:
        shipped = Path("configs/deepspeed")
        names = [path]
        if not path.suffix and len(path.parts) == 1:
            names += [shipped / f"{value}.yaml", shipped / f"{value}.json"]
        candidates = [Path.cwd() / name for name in names]
        candidates += [PACKAGED_DEEPSPEED_CONFIGS / name.name for name in names
                       if name.parent == shipped and name.suffix in (".yaml", ".json")]
    for candidate in candidates:
        if candidate.is_file():
            return candidate.resolve()
    raise ConfigError(f"deepspeed_config {value!r}: no such file (looked at {', '.join(map(str, candidates))})")


def read_deepspeed_config(path: Path) -> dict[str, Any]:
    if path.suffix == ".json":
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ConfigError(f"{path}: not valid JSON: {err}") from err
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected an object at the top level")
        return data
    return read_yaml(path)


def deepspeed_config(cfg: TrainConfig) -> dict[str, Any]:
    """The DeepSpeed config for ``cfg``: the file named by ``cfg.deepspeed_config`` with ``auto`` filled.

    Batch keys follow topro's global batch (``topro.train``): DeepSpeed's
    ``gradient_accumulation_steps`` is ``grad_accum``; its micro-batch size is
    nominal (batches are token-budgeted), ``batch_size // workers``.
    Precision: ``bf16.enabled: auto`` is on with a GPU, and on CPU follows
    ``dtype``; fp16 is refused on CPU. The optimizer is the loop's torch AdamW,
    so the file must not name one (DeepSpeed's ``Adam`` would compile FusedAdam).
    """
    if not cfg.deepspeed_config:
        raise ConfigError("strategy deepspeed needs deepspeed_config (e.g. configs/deepspeed/zero2.yaml)")
    path = resolve_deepspeed_config_path(cfg.deepspeed_config)
    ds = read_deepspeed_config(path)
    for key in ("optimizer", "scheduler"):
        if key in ds:
            raise ConfigError(f"{path}: remove {key!r}: topro passes its own torch AdamW and linear schedule "
                              "(learning_rate, weight_decay, adam_eps, warmup_ratio)")
    micro = max(1, cfg.batch_size // cfg.workers)
    _fill(ds, "gradient_accumulation_steps", cfg.grad_accum, path, "grad_accum")
    _fill(ds, "train_micro_batch_size_per_gpu", micro, path, "batch_size // workers")
    _fill(ds, "train_batch_size", micro * cfg.grad_accum * cfg.workers, path, "micro-batch x grad_accum x workers")
    _fill(ds, "gradient_clipping", float(cfg.max_grad_norm), path, "max_grad_norm")
    fp16 = ds.setdefault("fp16", {})
    bf16 = ds.setdefault("bf16", {})
    if fp16.get("enabled", False) == "auto":
        fp16["enabled"] = False
    if fp16.get("enabled") and not cfg.use_gpu:
        raise ConfigError(f"{path}: fp16 is not supported by DeepSpeed on CPU; use bf16 (dtype=bf16) or fp32")
    if bf16.get("enabled", "auto") == "auto":
        bf16["enabled"] = bool(cfg.use_gpu or cfg.dtype == "bf16")
    if fp16.get("enabled") and bf16.get("enabled"):
        raise ConfigError(f"{path}: fp16 and bf16 cannot both be enabled")
    ds.setdefault("steps_per_print", 10**9)  # the loop logs its own progress
    ds.setdefault("wall_clock_breakdown", False)
    return ds


def _fill(ds: dict[str, Any], key: str, value: Any, path: Path, source: str) -> None:
    current = ds.get(key, "auto")
    if current == "auto":
        ds[key] = value
    elif current != value:
        raise ConfigError(f"{path}: {key} is {current!r} but the run gives {value!r} ({source}); "
                          f"set it to auto or change the run's config")
