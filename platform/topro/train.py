"""The training loop: ``train(cfg)`` runs alone or inside a Ray Train worker.

In steps: ``prepare`` builds a ``Run`` (data, method, model, optimizer,
schedule); ``fit`` wraps it with the strategy, resumes a ``LoopState`` if
asked, and runs ``train_epoch`` until the epochs, ``max_steps`` or early
stopping end it; ``export_average`` handles ``selection: average_*``.
The loop evaluates English dev after every epoch (and every
``eval_every_steps`` or ``evals_per_epoch``); a ``CheckpointKeeper`` keeps
the best checkpoint and says when ``patience`` evaluations without gain stop
the run; ``fit`` writes ``metrics.json``. The module reads in that order, as a
recipe: ``train`` first, then ``prepare``, ``fit``, ``train_epoch`` and the
evaluation; the parts they use (``MethodModule``, ``LocalStrategy``,
``LoopState``, ``CheckpointKeeper``, the optimizer) follow at the end.

Scale-out differences (DDP, DeepSpeed, checkpoint reporting, resumption,
fault injection) live behind the strategy object; ``LocalStrategy`` is the
single-process one, ``topro.cluster.strategies`` holds the Ray Train ones.

Global batch semantics (the same for 1 or N workers): one *global*
micro-batch is built from the token budget exactly as on one worker (at most
``batch_size`` examples and ``max_tokens_per_batch`` padded tokens); with N
workers each takes an interleaved slice of it (``batching.split_batches``).
An optimizer step accumulates ``grad_accum`` global micro-batches, so it sees
the same examples, and an epoch has the same number of steps, for any N; the
learning rate and schedule need no rescaling. Each worker's loss is the mean
over its slice and DDP/DeepSpeed average gradients over workers, which equals
the one-worker mean when slices hold the same number of labelled words (they
differ by at most one example).
"""
from __future__ import annotations

import json
import logging
import math
import random
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from topro import atomic, interrupts
from topro.batching import split_batches, token_budget_batches
from topro.config import ConfigError, TrainConfig, to_dict
from topro.data import get_task, load_split
from topro.evaluate import autocast_for, evaluate_seen_labels
from topro.methods import Method, build_method, method_spec
from topro.methods.base import count_parameters, hide_unseen_gold
from topro.averaging import CheckpointAverager, check_selection, evaluation_due
from topro.metrics import metric_value, resolve_selection_metric
from topro.models import TINY, load_tokenizer, pick_device, resolve_model_path
from topro.strategy import Strategy
from topro.unseen import unseen_label_indices

log = logging.getLogger(__name__)

STATE_DIR = "state"
"""``output_dir/state``: the local loop's resumable state (a link to ``state.vN``), while a run is unfinished."""
RNG_FILE = "rng_state.pt"


# The recipe: the entry point, then prepare, fit, the epoch, evaluation.

def train(cfg: TrainConfig, strategy: Strategy | None = None, resume_from: Path | None = None) -> dict[str, Any]:
    """Train ``cfg``; returns the metrics document (also written to ``output_dir/metrics.json``).

    ``resume_from``: a checkpoint folder written by ``strategy.save_state`` and
    ``LoopState.save``; training continues from its step. The local loop resumes from
    ``output_dir/state`` when an interrupted run left one (and removes it when the run finishes).
    """
    from topro.quiet import quiet_stack

    quiet_stack(cfg.progress)
    strategy = strategy or LocalStrategy(cfg)
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    set_seed(cfg.seed)
    Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
    if strategy.resumable:
        atomic.clean_leftovers(cfg.output_dir, names=("checkpoint", STATE_DIR))
        resume_from = resume_from or local_resume_point(cfg)
    summary = fit(prepare(cfg, strategy), strategy, resume_from)
    if strategy.resumable:
        atomic.remove_folder(strategy.state_dir)  # finished: nothing left to resume
    return summary


RESUME_MAY_CHANGE = ("progress", "progress_every_s", "num_threads", "shutdown_grace_s", "save_state_every_steps",
                     "eval_langs", "max_sentences", "device")
"""Settings a resumed local run may change (they do not alter what training computes)."""


def local_resume_point(cfg: TrainConfig) -> Path | None:
    """``output_dir/state`` when an interrupted local run left one with the same settings, else ``None``."""
    folder = atomic.current_version(Path(cfg.output_dir) / STATE_DIR)
    if folder is None:
        return None
    saved = json.loads((folder / "config.json").read_text())
    now = to_dict(cfg)
    changed = [k for k in sorted(set(saved) | set(now)) if k not in RESUME_MAY_CHANGE and saved.get(k) != now.get(k)]
    if changed:
        shown = ", ".join(f"{k}: {saved.get(k)!r} there, {now.get(k)!r} now" for k in changed[:4])
        raise ConfigError(f"{Path(cfg.output_dir) / STATE_DIR} holds an unfinished run with other settings ({shown}): "
                          f"rerun with its settings to continue it, or delete that folder (or choose another "
                          f"--output) to start afresh")
    log.info("continuing the interrupted run in %s", folder)
    return folder


@dataclass
class Run:
    """A prepared run: its data, method, model, optimizer and schedule (``prepare`` builds it, ``fit`` trains it)."""

    cfg: TrainConfig
    task: Any
    selection: str
    """The English dev metric that picks the best checkpoint."""
    method: Method
    module: MethodModule
    """The model and the method's loss, not yet wrapped by the strategy."""
    optimizer: Any
    scheduler: Any
    examples: list
    """The encoded training examples."""
    lengths: list[int]
    sizes: list[int]
    dev_sentences: list
    steps_per_epoch: int
    accum: int
    """Micro-batches per optimizer step: ``grad_accum``, or an epoch's batches when it has fewer."""
    total_steps: int
    summary: dict[str, Any]
    """The run's description, the first keys of the returned summary."""


def prepare(cfg: TrainConfig, strategy: Strategy) -> Run:
    """Data, method, model, optimizer and schedule for ``cfg`` on ``strategy``'s rank.

    The order of the steps is the order in which they draw random numbers (the
    method, then the model): it must not change, or the same seed trains differently.
    """
    task = get_task(cfg.task)
    selection = resolve_selection_metric(task, cfg.selection_metric)
    if selection == "viterbi_f1" and not cfg.viterbi:
        raise ConfigError("selection_metric: 'viterbi_f1' needs viterbi: true")
    model_path = resolve_model_path(cfg.model, task.name, cfg.data_dir)
    tokenizer = load_tokenizer(model_path)
    spec = method_spec(cfg, model_path)
    if spec.mlm_head_untrained and strategy.is_main:
        log.warning("%s: %s has no masked-LM head: ToPro's head starts from random weights (not pretrained), "
                    "so its scores are not those of the published method; flagged in metrics.json, MLflow and "
                    "the report", cfg.method, cfg.model)
    method = build_method(spec, model_path, tokenizer)
    train_sentences = training_sentences(cfg, task, spec.unseen_labels)
    dev_sentences = load_split(task, cfg.train_lang, "dev", cfg.data_dir, limit=cfg.max_dev_sentences)
    # Generalized zero-shot: gold words of unseen labels carry no loss (and their label words leave the
    # training softmax inside the method's loss).
    examples, n_unseen_hidden = hide_unseen_gold(method.encode(train_sentences),
                                                 unseen_label_indices(method.labels, spec.unseen_labels))
    lengths = [e.length for e in examples]
    sizes = [e.batch_units for e in examples]
    steps_per_epoch, accum = plan_steps(cfg, lengths, sizes, strategy)
    total_steps = 0 if cfg.epochs == 0 else cfg.max_steps or steps_per_epoch * cfg.epochs
    check_selection(cfg, steps_per_epoch, getattr(strategy, "zero_stage", None))
    base_model = method.build_model(model_path)
    if embeddings_frozen(cfg) and cfg.adapter == "none":  # LoRA has frozen every pretrained weight already
        freeze_input_embeddings(base_model)
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(base_model)
    n_trainable, n_total = count_parameters(base_model)
    log.info("%s: %d trainable of %d parameters (%.3f%%)", method.name, n_trainable, n_total,
             100 * n_trainable / max(n_total, 1))
    module = MethodModule(method, base_model)
    optimizer, scheduler = build_optimizer(cfg, module, total_steps)
    summary: dict[str, Any] = {
        "config": to_dict(cfg), "model_path": model_path, "method": method.name,
        "n_train_sentences": len(train_sentences), "n_train_words": sum(len(s) for s in train_sentences),
        "n_train_examples": len(examples),
        "n_train_truncated_words": sum(e.truncated_words for e in examples),
        "n_train_trimmed_prompts": sum(len(e.words) * int(e.trimmed_context) for e in examples),
        "n_train_questions": sum(len(e.words) for e in examples), "n_train_tokens": sum(lengths),
        "n_dev_sentences": len(dev_sentences), "world_size": strategy.world_size,
        "selection_metric": selection,
        "mlm_head_untrained": bool(spec.mlm_head_untrained),
        "unseen_labels": list(spec.unseen_labels), "n_train_unseen_label_words": n_unseen_hidden,
        **label_word_summary(method),
        "steps_per_epoch": steps_per_epoch, "batches_per_step": accum,
        "n_trainable_params": n_trainable, "n_total_params": n_total,
    }
    return Run(cfg, task, selection, method, module, optimizer, scheduler, examples, lengths, sizes, dev_sentences,
               steps_per_epoch, accum, total_steps, summary)


def training_sentences(cfg: TrainConfig, task, unseen: list[str]) -> list:
    """The English training sentences: the first ``max_train_sentences``, or with ``shots_per_label`` the
    seeded few-shot sample of them that gives every seen label at least that many words."""
    from topro.data.sampling import few_shot_sentences

    sentences = load_split(task, cfg.train_lang, "train", cfg.data_dir, limit=cfg.max_train_sentences)
    if cfg.shots_per_label is None:
        return sentences
    seen = [label for label in task.labels if label not in set(unseen)]
    return few_shot_sentences(sentences, seen, cfg.shots_per_label, cfg.seed)


def label_word_summary(method: Method) -> dict[str, Any]:
    """RoSPrompt: each label's scored words (and any warning about them), for ``metrics.json``."""
    meta = method.meta() if hasattr(method, "readable_label_words") else {}
    return {k: meta[k] for k in ("label_word_sets", "label_word_warnings") if k in meta}


def plan_steps(cfg: TrainConfig, lengths: list[int], sizes: list[int], strategy: Strategy) -> tuple[int, int]:
    """(optimizer steps per epoch, micro-batches per step) for these examples on ``strategy``'s workers."""
    # The number of batches depends only on the lengths, not on the epoch's shuffle.
    batches_per_epoch = len(epoch_batches(cfg, lengths, 0, strategy.rank, strategy.world_size, sizes))
    if batches_per_epoch == 0:
        raise ValueError(f"{len(lengths)} training examples give no batch for {strategy.world_size} workers")
    # An optimizer step accumulates `grad_accum` micro-batches; an epoch with
    # fewer batches than that steps once on all of them (else no step would
    # ever be taken and gradients would pile up).
    accum = min(cfg.grad_accum, batches_per_epoch)
    if accum < cfg.grad_accum and strategy.is_main:
        log.warning("an epoch has %d batches, fewer than grad_accum=%d: each epoch takes one optimizer "
                    "step over its %d batches", batches_per_epoch, cfg.grad_accum, batches_per_epoch)
    return batches_per_epoch // accum, accum


@dataclass
class Throughput:
    """Training time and work of this worker (evaluation excluded), and when the next progress line is due."""

    seconds: float = 0.0
    examples: int = 0
    tokens: int = 0
    next_line: float = 0.0


def fit(run: Run, strategy: Strategy, resume_from: Path | None = None) -> dict[str, Any]:
    """Train a prepared run; returns the summary (written to ``output_dir/metrics.json`` by the main rank)."""
    cfg = run.cfg
    strategy.wrap(run.module, run.optimizer, run.scheduler)
    state = LoopState()
    if resume_from is not None:
        state = LoopState.load(Path(resume_from))
        strategy.load_state(Path(resume_from))
        if strategy.is_main:
            log.info("resumed from step %d (epoch %d) of checkpoint %s", state.step, state.epoch, resume_from)
    keeper = CheckpointKeeper(state, cfg.patience, CheckpointAverager(cfg.selection, cfg.k))
    throughput = Throughput()
    # A run resumed after it had decided to stop stops again.
    stop = keeper.patience_spent or bool(cfg.max_steps and state.step >= cfg.max_steps)
    while state.epoch < cfg.epochs and not stop:
        stop = train_epoch(run, strategy, keeper, throughput)
    if cfg.epochs == 0 and not state.history:  # zero-shot prompting: score and export the initial prompt
        evaluate_and_keep(run, strategy, keeper, float("nan"), 0)
    averaged = export_average(run, strategy, keeper)
    # Throughput over all workers: they run in lockstep, so rank 0's time is the run's.
    all_examples = strategy.average(float(throughput.examples)) * strategy.world_size
    all_tokens = strategy.average(float(throughput.tokens)) * strategy.world_size
    seconds = throughput.seconds
    summary = {
        **run.summary,
        "best_step": state.best_step, f"best_dev_{run.selection}": state.best_metric,
        "history": state.history, "steps": state.step,
        "resumed_from_step": state.resumed_from_step,
        "train_seconds": seconds,
        "examples_per_second": all_examples / seconds if seconds else None,
        "tokens_per_second": all_tokens / seconds if seconds else None,
        "checkpoint": str(strategy.export_dir) if strategy.export_dir else None,
        **averaged,
    }
    if strategy.is_main:
        atomic.write_json(Path(cfg.output_dir) / "metrics.json", summary, "metrics")
    return summary


def train_epoch(run: Run, strategy: Strategy, keeper: CheckpointKeeper, throughput: Throughput) -> bool:
    """Train the rest of epoch ``state.epoch`` (all of it unless resumed mid-epoch), evaluating when due
    and at its end; returns whether training stops (early stopping or ``max_steps``)."""
    cfg, state, accum = run.cfg, keeper.state, run.accum
    batches = epoch_batches(cfg, run.lengths, state.epoch, strategy.rank, strategy.world_size, run.sizes)
    skip = state.micro_batches_done(run.steps_per_epoch, accum)
    # A remainder smaller than grad_accum is dropped: every step sees a full global batch.
    usable = run.steps_per_epoch * accum
    strategy.wrapped.train()
    # Resumed mid-epoch: the epoch's running loss continues, so the next record's train_loss is unchanged.
    running, n_loss = (state.epoch_loss_sum, state.epoch_loss_count) if skip > 0 else (0.0, 0)
    stop = False
    bar = tqdm(total=min(len(batches), usable), desc=f"epoch {state.epoch + 1}/{cfg.epochs}",
               disable=not (cfg.progress and strategy.is_main), initial=max(skip, 0))
    # Without bars, a line at the first step (a trial shows signs of life at once), then every progress_every_s.
    lines = bool(bar.disable and strategy.is_main and cfg.progress_every_s)
    # Strategies divide by grad_accum; a shorter group still averages its batches.
    scale = cfg.grad_accum / accum if accum != cfg.grad_accum else None
    for micro, batch_ids in enumerate(batches[:usable]):
        if micro < skip:
            continue
        strategy.before_micro_batch(state, step_start=micro % accum == 0)
        start = time.perf_counter()
        chunk = [run.examples[i] for i in batch_ids]
        batch = {k: v.to(strategy.device) for k, v in run.method.collate(chunk).items()}
        boundary = (micro + 1) % accum == 0
        loss = strategy.train_micro_batch(batch, boundary, scale)
        if boundary:
            state.step += 1
        throughput.seconds += time.perf_counter() - start
        throughput.examples += len(chunk)
        throughput.tokens += sum(e.length for e in chunk)
        running += float(loss.detach())
        n_loss += 1
        bar.update(1)
        bar.set_postfix(loss=f"{running / n_loss:.4f}")
        if not boundary:
            continue
        state.epoch_loss_sum, state.epoch_loss_count = running, n_loss
        strategy.after_step(state.step)
        if lines and time.perf_counter() >= throughput.next_line:
            throughput.next_line = time.perf_counter() + cfg.progress_every_s
            log.info("%sepoch %d/%d step %d/%d: loss %.4f, %.1f examples/s",
                     f"{cfg.run_name}: " if cfg.run_name else "", state.epoch + 1, cfg.epochs, state.step,
                     run.total_steps, running / n_loss,
                     throughput.examples * strategy.world_size / max(throughput.seconds, 1e-9))
        if evaluation_due(cfg, state.step, run.steps_per_epoch):
            stop = evaluate_and_keep(run, strategy, keeper, running / n_loss, state.epoch)
            if stop:
                break
        if cfg.max_steps and state.step >= cfg.max_steps:
            stop = True
            break
    bar.close()
    finished_epoch = state.epoch
    state.epoch += 1  # before the end-of-epoch evaluation: its checkpoint resumes at the next epoch
    state.epoch_loss_sum, state.epoch_loss_count = 0.0, 0
    if not state.evaluated_now():
        stop = evaluate_and_keep(run, strategy, keeper, running / max(n_loss, 1), finished_epoch) or stop
    return stop


def epoch_batches(cfg: TrainConfig, lengths: list[int], epoch: int, rank: int, world_size: int,
                  sizes: list[int] | None = None) -> list[list[int]]:
    """This rank's micro-batches of ``epoch``: its slices of the global token-budget batches
    (``sizes``: what each example counts towards ``batch_size``, see ``Encoded.batch_units``)."""
    batches = token_budget_batches(lengths, cfg.max_tokens_per_batch, cfg.batch_size, shuffle=True,
                                   seed=cfg.seed + epoch, sizes=sizes)
    return split_batches(batches, rank, world_size)


def evaluate_dev(run: Run, strategy: Strategy) -> tuple[dict[str, Any], float]:
    """English dev scores of the current weights, and the selection metric averaged over workers."""
    cfg = run.cfg
    eval_method, eval_model = strategy.evaluation()
    # With unseen_labels: only the seen labels are predicted and scored, as in training.
    dev = evaluate_seen_labels(eval_method, eval_model, run.task, run.dev_sentences, viterbi=cfg.viterbi,
                               device=strategy.device, dtype=cfg.dtype,
                               max_tokens_per_batch=cfg.dev_max_tokens_per_batch(), max_examples=cfg.batch_size * 4)
    # Every rank scores the same dev set; averaging makes their early-stopping decisions identical.
    return dev, strategy.average(metric_value(dev, run.selection))


def evaluate_and_keep(run: Run, strategy: Strategy, keeper: CheckpointKeeper, train_loss: float,
                      epoch: int) -> bool:
    """Evaluate dev; keep the best; return True when early stopping says stop."""
    task, selection, state = run.task, run.selection, keeper.state
    dev, metric = evaluate_dev(run, strategy)
    record = {"epoch": epoch, "step": state.step, "train_loss": strategy.average(train_loss),
              f"dev_{task.metric}": dev[task.metric], "dev_accuracy": dev["accuracy"],
              f"dev_{selection}": metric}
    if task.scheme == "iob2":
        record["dev_f1_strict"] = dev["f1_strict"]
    if "viterbi" in dev:
        record["dev_viterbi_f1"] = dev["viterbi"]["f1"]
    improved = keeper.add(record, metric, strategy.plain_model)
    if strategy.is_main:
        log.info("epoch %d step %d: train loss %.4f, dev %s %.4f%s", epoch, state.step, record["train_loss"],
                 selection, metric, " (best)" if improved else "")
    strategy.checkpoint(state, record, improved=improved)
    return keeper.patience_spent


def export_average(run: Run, strategy: Strategy, keeper: CheckpointKeeper) -> dict[str, Any]:
    """``selection: average_*``: load the kept checkpoints' mean, score and export it; returns the summary's
    ``selection`` keys (just ``selection`` for ``best``)."""
    cfg, state = run.cfg, keeper.state
    averaged: dict[str, Any] = {"selection": cfg.selection}
    if not keeper.averager.active:
        return averaged
    steps = keeper.averager.average_into(strategy.plain_model)
    averaged.update(k=cfg.k, averaged_steps=steps)
    if not steps:
        return averaged
    if len(steps) < cfg.k and strategy.is_main:
        log.warning("selection %s: only %d of k=%d checkpoints to average (early stopping or a restart)",
                    cfg.selection, len(steps), cfg.k)
    _, score = evaluate_dev(run, strategy)
    averaged[f"averaged_dev_{run.selection}"] = score
    if strategy.is_main:
        log.info("selection %s: averaged the checkpoints of steps %s: dev %s %.4f (best single %.4f)",
                 cfg.selection, steps, run.selection, score, state.best_metric)
    # Flagged best and averaged: its export replaces the best single checkpoint's.
    strategy.checkpoint(state, {"epoch": state.epoch, "step": state.step, f"dev_{run.selection}": score,
                                "averaged_steps": len(steps)}, improved=True, averaged=True)
    return averaged


# The parts the recipe is made of: the method as a module, the single-process strategy, the loop's
# state, the checkpoint keeper and the optimizer.

def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class MethodModule(torch.nn.Module):
    """The model and its method in one module: ``forward`` gives the method's training loss, or with
    ``output="scores"`` its label log-probabilities.

    DDP and DeepSpeed only see parameter use that happens inside their
    wrapper's forward; ToPro's loss calls the encoder and the MLM head
    separately, so the wrapper must wrap the method, not just the model.
    Scores go through the same wrapper because ZeRO-3 gathers parameters
    only inside its forward (see ``DeepSpeedStrategy.evaluation``).
    """

    def __init__(self, method: Method, model: torch.nn.Module):
        super().__init__()
        self.model = model
        self.method = method  # not a Module: not part of the state dict

    def forward(self, batch: dict[str, torch.Tensor], output: str = "loss") -> torch.Tensor:
        if output == "scores":
            return self.method.label_log_probs(self.model, batch)
        return self.method.loss(self.model, batch)


class LocalStrategy:
    """Single process: plain AdamW steps with gradient accumulation and clipping (a ``topro.strategy.Strategy``;
    the Ray strategies reuse its steps and add Ray's part beside it)."""

    rank = 0
    world_size = 1
    resumable = True
    """Whether it keeps ``output_dir/state`` itself (Ray strategies resume from Ray Train checkpoints)."""

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.device = pick_device(cfg.device)
        self.step_rng: dict[str, Any] | None = None
        self.state_saved_at: int | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def export_dir(self) -> Path | None:
        """Where the best model's consolidated export is written (``None``: the Ray driver decides)."""
        return Path(self.cfg.output_dir) / "checkpoint"

    def wrap(self, module: MethodModule, optimizer, scheduler):
        self.wrapped, self.optimizer, self.scheduler = module.to(self.device), optimizer, scheduler
        return self.wrapped

    @property
    def module(self) -> MethodModule:
        """The ``MethodModule`` inside the wrapper."""
        return self.wrapped

    @property
    def plain_model(self) -> torch.nn.Module:
        """The plain model (what the method evaluates, averages and saves)."""
        return self.module.model

    def train_micro_batch(self, batch: dict[str, torch.Tensor], boundary: bool, scale: float | None) -> torch.Tensor:
        """Forward and backward of one micro-batch (``scale``: the loss's factor), an optimizer step at a
        boundary; returns the unscaled loss."""
        with self.accumulating(boundary):
            with autocast_for(self.device, self.cfg.dtype):
                loss = self.wrapped(batch)
            self.backward_and_step(loss if scale is None else loss * scale, boundary)
        return loss

    def accumulating(self, boundary: bool):
        """Context around one micro-batch's forward and backward (DDP skips the all-reduce off boundaries)."""
        return nullcontext()

    def backward_and_step(self, loss: torch.Tensor, boundary: bool) -> None:
        (loss / self.cfg.grad_accum).backward()
        if not boundary:
            return
        if self.cfg.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.wrapped.parameters(), self.cfg.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def evaluation(self) -> tuple[Method, torch.nn.Module]:
        """The (method, model) pair that evaluation predicts with: here the method and the plain model."""
        return self.module.method, self.plain_model

    def average(self, value: float) -> float:
        """Mean of ``value`` over workers (also makes every rank take the same decision)."""
        return value

    def save_model(self, folder: Path) -> None:
        """The consolidated export (safetensors + tokenizer + topro.json with each weight file's size and
        sha256) that evaluation and serving load, written into ``folder``."""
        if self.is_main:
            from topro.checkpoint_files import record_weights

            self.module.method.save(self.plain_model, folder)
            record_weights(folder)

    def export(self) -> None:
        """The export, published atomically as ``export_dir`` (a link to ``checkpoint.vN``): the previous
        best stays whole until the new one is complete."""
        with atomic.staged_folder(self.export_dir, "checkpoint_export", needed=state_bytes(self.plain_model)) as tmp:
            self.save_model(tmp)

    def save_state(self, folder: Path) -> None:
        """Model, optimizer and scheduler state, for resuming."""
        torch.save({"model": self.plain_model.state_dict(), "optimizer": self.optimizer.state_dict(),
                    "scheduler": self.scheduler.state_dict()}, folder / "training_state.pt")

    def load_state(self, folder: Path) -> None:
        state = torch.load(folder / "training_state.pt", map_location=self.device, weights_only=True)
        self.plain_model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if (folder / RNG_FILE).is_file():  # the local loop's state: continue the random streams too
            set_rng_states(torch.load(folder / RNG_FILE, weights_only=True))

    @property
    def state_dir(self) -> Path:
        return Path(self.cfg.output_dir) / STATE_DIR

    def before_micro_batch(self, state: "LoopState", step_start: bool) -> None:
        """Before each micro-batch of the local loop: at a step's start remember the RNG states (what a
        resumed run continues from) and save ``state/`` when ``save_state_every_steps`` says so; on
        SIGTERM/SIGINT save it and stop with ``Interrupted``. A step under way is abandoned: the weights
        have not changed since it started, only gradients were accumulated."""
        if not self.resumable:
            return
        if step_start:
            self.step_rng = rng_states()
            every = self.cfg.save_state_every_steps
            if every and state.step and state.step % every == 0 and state.step != self.state_saved_at:
                self.save_resumable(state)
        stops = interrupts.active()
        if stops.requested:
            seconds = self.save_resumable(state)
            late = stops.elapsed() > self.cfg.shutdown_grace_s
            raise stops.interrupted(
                f"stopped at step {state.step} (epoch {state.epoch + 1}); saved the resumable state {self.state_dir} "
                f"(model, optimizer, scheduler, RNG states, loop position) in {seconds:.1f} s"
                f"{f', later than shutdown_grace_s={self.cfg.shutdown_grace_s:g}' if late else ''}; the best export "
                f"{self.export_dir} is kept. Resume: rerun the same command ({interrupts.resume_command()})")

    def save_resumable(self, state: "LoopState") -> float:
        """Write ``state/`` atomically (model, optimizer, scheduler, RNG states at the step's start, loop
        position, config); returns the seconds it took."""
        start = time.perf_counter()
        with atomic.staged_folder(self.state_dir, "training_state",
                                  needed=3 * state_bytes(self.plain_model)) as tmp:
            self.save_state(tmp)
            torch.save(self.step_rng if self.step_rng is not None else rng_states(), tmp / RNG_FILE)
            state.save(tmp)
            atomic.write_json(tmp / "config.json", to_dict(self.cfg), "training_state")
        self.state_saved_at = state.step
        seconds = time.perf_counter() - start
        log.info("saved the resumable state %s at step %d in %.2f s", self.state_dir, state.step, seconds)
        return seconds

    def checkpoint(self, state: "LoopState", record: dict[str, Any], *, improved: bool, averaged: bool = False) -> None:
        """After an English dev evaluation (or the averaging, ``averaged``): keep the model if it is the
        new best (Ray strategies also checkpoint and report here)."""
        if improved and self.is_main:
            self.export()

    def after_step(self, step: int) -> None:
        """Called after every optimizer step (fault injection in the Ray layer)."""


def rng_states() -> dict[str, Any]:
    """Every random stream training draws from (Python, NumPy, torch CPU and CUDA), as tensors and plain
    values that ``torch.load(weights_only=True)`` reads back."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"python": random.getstate(), "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss,
                                                    cached],
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_states(states: dict[str, Any]) -> None:
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def state_bytes(model: torch.nn.Module) -> int:
    """Bytes of ``model``'s state dict (what an export writes, give or take the tokenizer)."""
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


@dataclass
class LoopState:
    """What the loop needs to resume (``epoch``: the epoch to continue, ``step``: optimizer steps done).

    Written as ``loop_state.json`` into every Ray checkpoint (the fields are its keys).
    """

    epoch: int = 0
    step: int = 0
    best_metric: float = -math.inf
    best_step: int = -1
    bad_evaluations: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    resumed_from_step: int | None = None
    epoch_loss_sum: float = 0.0
    """Sum of the current epoch's micro-batch losses up to ``step`` (a mid-epoch resume continues it)."""
    epoch_loss_count: int = 0

    @classmethod
    def load(cls, folder: Path) -> "LoopState":
        state = cls(**json.loads((Path(folder) / "loop_state.json").read_text()))
        state.resumed_from_step = state.step
        return state

    def save(self, folder: Path) -> None:
        atomic.write_json(folder / "loop_state.json", self.__dict__, "loop_state")

    def micro_batches_done(self, steps_per_epoch: int, accum: int) -> int:
        """Micro-batches of the current epoch already trained (a checkpoint taken mid-epoch)."""
        return (self.step - self.epoch * steps_per_epoch) * accum

    def evaluated_now(self) -> bool:
        """Whether the latest evaluation was at the current step."""
        return bool(self.history and self.history[-1]["step"] == self.step)


@dataclass
class CheckpointKeeper:
    """Best-checkpoint keeping and early stopping over a run's English dev evaluations.

    Each evaluation's record goes into the history and its weights into the
    averager (``selection: average_*``); a strictly better score is the new
    best, anything else spends one unit of ``patience``.
    """

    state: LoopState
    patience: int
    averager: CheckpointAverager

    def add(self, record: dict[str, Any], metric: float, model: torch.nn.Module) -> bool:
        """Record one evaluation of ``model`` at the current step; returns whether it improved."""
        state = self.state
        state.history.append(record)
        self.averager.add(model, state.step, metric)
        improved = metric > state.best_metric
        if improved:
            state.best_metric, state.best_step, state.bad_evaluations = metric, state.step, 0
        else:
            state.bad_evaluations += 1
        return improved

    @property
    def patience_spent(self) -> bool:
        return self.state.bad_evaluations >= self.patience


def embeddings_frozen(cfg: TrainConfig) -> bool:
    """``cfg.freeze_embeddings``, with ``None`` meaning: frozen unless the model is the random ``tiny``."""
    if cfg.freeze_embeddings is None:
        return cfg.model != TINY
    return cfg.freeze_embeddings


def freeze_input_embeddings(model: torch.nn.Module) -> None:
    """Stop gradients to the word-embedding matrix (and to an output layer tied to it)."""
    get = getattr(model, "get_input_embeddings", None)
    embeddings = get() if get is not None else None
    if embeddings is None:  # wrappers (soft prompts) expose their backbone's
        inner = [m for m in model.modules() if m is not model and hasattr(m, "get_input_embeddings")]
        embeddings = inner[0].get_input_embeddings() if inner else None
    if embeddings is None:
        raise ValueError(f"freeze_embeddings: {type(model).__name__} has no input embeddings to freeze")
    embeddings.weight.requires_grad_(False)


def enable_gradient_checkpointing(model: torch.nn.Module) -> None:
    """Activation recomputation in every Hugging Face model inside ``model`` (a method's wrapper holds one).
    Non-reentrant, so it works when no input needs a gradient (frozen embeddings, LoRA)."""
    from transformers import PreTrainedModel

    found = [m for m in model.modules() if isinstance(m, PreTrainedModel) and m.supports_gradient_checkpointing]
    if not found:
        raise ConfigError(f"gradient_checkpointing: {type(model).__name__} holds no Hugging Face model that "
                          "supports it")
    for hf in found:
        if hasattr(hf, "activation_checkpointing_enable"):  # transformers 5's name; the old one is deprecated
            hf.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def build_optimizer(cfg: TrainConfig, model: torch.nn.Module, total_steps: int):
    from transformers import get_linear_schedule_with_warmup

    params = [p for p in model.parameters() if p.requires_grad]
    # torch's fused AdamW makes one pass over each tensor where its default (for-loop) kernel makes about
    # ten: a step over multilingual-e5-small's 118M parameters (96M of them the embedding matrix) takes
    # 0.09 s instead of 1.2 s on 2 CPU cores (benchmarks/optimizer_step.py), the same update within rounding.
    fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params) or None
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, eps=cfg.adam_eps, weight_decay=cfg.weight_decay,
                                  fused=fused)
    warmup = int(cfg.warmup_ratio * total_steps)
    scheduler = get_linear_schedule_with_warmup(optimizer, warmup, max(total_steps, 1))
    return optimizer, scheduler
