"""The contract between the training loop and where it runs: one process, DDP or DeepSpeed.

``topro.train`` (``prepare``, ``fit``, the epoch, evaluation) calls only what ``Strategy`` names, so the same
loop runs alone or inside a Ray Train worker. ``train.LocalStrategy`` is one process;
``cluster.strategies.DDPStrategy`` and ``DeepSpeedStrategy`` add Ray's part (``cluster.strategies.RayWorker``:
ranks, reporting, faults) beside it. ``tests/test_strategy.py`` checks all three against this protocol.
"""
from __future__ import annotations

from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:  # annotations only: this module imports neither torch nor the loop (which imports it)
    import torch

    from topro.methods import Method


@runtime_checkable
class Strategy(Protocol):
    """What differs between one process, DDP and DeepSpeed."""

    rank: int
    """This worker's rank (0 in one process)."""
    world_size: int
    """Number of workers."""
    device: Any
    """The ``torch.device`` this worker computes on."""

    @property
    def is_main(self) -> bool:
        """Rank 0: the worker that writes exports and logs."""

    @property
    def export_dir(self) -> Path | None:
        """Where the best model's consolidated export goes (``None``: the Ray driver decides)."""

    def wrap(self, module: torch.nn.Module, optimizer, scheduler) -> Any:
        """The ``train.MethodModule`` as the loop calls it: itself, a DDP wrapper or a DeepSpeed engine."""

    @property
    def module(self) -> torch.nn.Module:
        """The ``train.MethodModule`` inside the wrapper."""

    @property
    def plain_model(self) -> torch.nn.Module:
        """The plain model (what the method evaluates, averages and saves)."""

    def train_micro_batch(self, batch: dict[str, torch.Tensor], boundary: bool,
                          scale: float | None) -> torch.Tensor:
        """Forward and backward of one micro-batch, an optimizer step at an accumulation boundary."""

    def accumulating(self, boundary: bool) -> AbstractContextManager:
        """Context around one micro-batch (DDP skips the all-reduce off boundaries)."""

    def backward_and_step(self, loss: torch.Tensor, boundary: bool) -> None:
        """Backward of one micro-batch's loss; clip, step and zero the gradients at a boundary."""

    def evaluation(self) -> tuple[Method, torch.nn.Module]:
        """The (method, model) pair that evaluation predicts with."""

    def average(self, value: float) -> float:
        """Mean of ``value`` over workers (so every rank takes the same decision)."""

    def save_model(self, folder: Path) -> None:
        """The consolidated export (weights, tokenizer, ``topro.json``) that evaluation and serving load."""

    def save_state(self, folder: Path) -> None:
        """Model, optimizer and scheduler state, for resuming."""

    def load_state(self, folder: Path) -> None:
        """Restore what ``save_state`` wrote."""

    def restore_rank_state(self, folder: Path, state: Any) -> None:
        """After ``load_state``, with the loop's ``train.LoopState`` from the same checkpoint: restore what only
        this rank knew (Ray: its RNG streams and its running loss of the epoch; the local loop keeps both in
        its state already)."""

    def checkpoint(self, state: Any, record: dict[str, Any], *, improved: bool, averaged: bool = False) -> None:
        """After an English dev evaluation (or the averaging), with the loop's ``train.LoopState``: keep the
        model if it is the new best; Ray strategies also checkpoint and report here."""

    def after_step(self, step: int) -> None:
        """Called after every optimizer step (fault injection in the Ray layer)."""
