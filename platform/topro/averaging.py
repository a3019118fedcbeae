"""Checkpoint selection without target-language data: the best English-dev checkpoint, or the average
of the weights of the last / the best ``k`` English-dev checkpoints of a run (Ray-free).

Schmidt et al. (2023) show that averaging checkpoints makes zero-shot transfer less sensitive to which
English-dev checkpoint is chosen. The loop snapshots the *trainable* parameters at each English dev
evaluation (frozen ones are the same in every checkpoint, so averaging them changes nothing), keeps
the ``k`` it needs, and at the end loads their mean into the model before the export is written.

Where it runs: the single-process loop, and Ray Train with DDP or DeepSpeed ZeRO-0/1/2 (every rank
holds the full parameters: each rank snapshots and averages the same values, so the replicas stay
identical). ZeRO-3 partitions the parameters across ranks; averaging there is refused at start-up
(``selection: best`` works with every stage). Snapshots live in memory: a run that Ray restarts after a
worker failure averages the checkpoints made after the restart (``averaged_steps`` says which).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from topro.config import ConfigError, TrainConfig

SELECTIONS = ("best", "average_last_k", "average_top_k")


def evaluation_due(cfg: TrainConfig, step: int, steps_per_epoch: int) -> bool:
    """Whether the loop evaluates English dev after optimizer step ``step`` (besides each epoch's end)."""
    if cfg.eval_every_steps:
        return step % cfg.eval_every_steps == 0
    if cfg.evals_per_epoch:
        in_epoch = (step - 1) % steps_per_epoch + 1
        n = cfg.evals_per_epoch
        return any(math.ceil(steps_per_epoch * i / n) == in_epoch for i in range(1, n + 1))
    return False


def planned_evaluations(cfg: TrainConfig, steps_per_epoch: int) -> int:
    """English dev evaluations a run makes if early stopping does not cut it short."""
    count, step, last = 0, 0, -1
    for _ in range(cfg.epochs):
        for _ in range(steps_per_epoch):
            step += 1
            if evaluation_due(cfg, step, steps_per_epoch):
                count, last = count + 1, step
            if cfg.max_steps and step >= cfg.max_steps:
                break
        if last != step:
            count, last = count + 1, step
        if cfg.max_steps and step >= cfg.max_steps:
            break
    return count


def check_selection(cfg: TrainConfig, steps_per_epoch: int | None = None, zero_stage: int | None = None) -> None:
    """``selection`` and ``k`` make sense for this run; errors name the field."""
    if cfg.selection == "best":
        return
    if cfg.k < 1:
        raise ConfigError(f"k: must be at least 1 for selection {cfg.selection!r}, got {cfg.k}")
    if zero_stage == 3:
        raise ConfigError(f"selection {cfg.selection!r}: not supported with DeepSpeed ZeRO-3 (parameters are "
                          f"partitioned across ranks); use ZeRO-2, DDP or selection: best")
    if steps_per_epoch is not None:
        kept = planned_evaluations(cfg, steps_per_epoch)
        if cfg.k > kept:
            raise ConfigError(f"k: {cfg.k} is larger than the {kept} English-dev checkpoints this run keeps "
                              f"(epochs={cfg.epochs}, eval_every_steps={cfg.eval_every_steps}, "
                              f"evals_per_epoch={cfg.evals_per_epoch}, "
                              f"max_steps={cfg.max_steps}, {steps_per_epoch} steps per epoch); lower k or "
                              f"evaluate more often")


@dataclass
class Snapshot:
    step: int
    score: float
    weights: dict[str, torch.Tensor]


@dataclass
class CheckpointAverager:
    """Keeps the snapshots ``selection`` needs and averages them."""

    selection: str
    k: int
    kept: list[Snapshot] = field(default_factory=list)

    @property
    def active(self) -> bool:
        return self.selection != "best"

    def add(self, model: torch.nn.Module, step: int, score: float) -> None:
        if not self.active:
            return
        weights = {n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters() if p.requires_grad}
        self.kept.append(Snapshot(step, score, weights))
        if self.selection == "average_last_k":
            self.kept = self.kept[-self.k:]
        else:  # the k best; an equal score keeps the later checkpoint, as best selection does not
            self.kept = sorted(self.kept, key=lambda s: (s.score, s.step), reverse=True)[:self.k]

    def average_into(self, model: torch.nn.Module) -> list[int]:
        """Load the mean of the kept snapshots into ``model``; returns their steps."""
        if not self.kept:
            return []
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name in self.kept[0].weights:
                total = torch.zeros_like(self.kept[0].weights[name], dtype=torch.float64)
                for snapshot in self.kept:
                    total += snapshot.weights[name].to(torch.float64)
                params[name].copy_((total / len(self.kept)).to(params[name].dtype))
        return sorted(s.step for s in self.kept)
