"""The training loop: one function that runs alone or inside a Ray Train worker.

Scale-out differences (DDP, DeepSpeed, checkpoint reporting, resumption,
fault injection) live behind the strategy object; ``LocalStrategy`` is the
single-process one, ``topro.cluster.strategies`` holds the Ray Train ones.
The loop evaluates English dev after every epoch (and every
``eval_every_steps`` or ``evals_per_epoch``), keeps the best checkpoint, stops early after
``patience`` evaluations without gain, and writes ``metrics.json``.

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

from topro.batching import split_batches, token_budget_batches
from topro.config import ConfigError, TrainConfig, to_dict
from topro.data import get_task, load_split
from topro.evaluate import autocast_for, evaluate_sentences
from topro.methods import Method, MethodSpec, build_method
from topro.methods.base import count_parameters
from topro.averaging import CheckpointAverager, check_selection, evaluation_due
from topro.metrics import metric_value, resolve_selection_metric
from topro.models import TINY, load_tokenizer, mlm_head_untrained, pick_device, resolve_model_path

log = logging.getLogger(__name__)


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class LossModule(torch.nn.Module):
    """The model and the method's loss in one ``forward``.

    DDP and DeepSpeed only see parameter use that happens inside their
    wrapper's forward; ToPro's loss calls the encoder and the MLM head
    separately, so the wrapper must wrap the whole loss, not the model.
    ``scores=True`` returns the method's label log-probabilities instead
    (evaluation through the wrapper, which ZeRO-3 needs to gather parameters).
    """

    def __init__(self, method: Method, model: torch.nn.Module):
        super().__init__()
        self.model = model
        self.method = method  # not a Module: not part of the state dict

    def forward(self, batch: dict[str, torch.Tensor], scores: bool = False) -> torch.Tensor:
        if scores:
            return self.method.label_log_probs(self.model, batch)
        return self.method.loss(self.model, batch)


class LocalStrategy:
    """Single process: plain AdamW steps with gradient accumulation and clipping.

    The protocol every strategy follows. ``setup`` receives a ``LossModule``
    and returns what the loop calls to get the loss (the module itself, a DDP
    wrapper, a DeepSpeed engine); ``unwrap`` returns the plain model inside.
    """

    rank = 0
    world_size = 1

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.device = pick_device(cfg.device)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def export_dir(self) -> Path | None:
        """Where the best model's consolidated export is written (``None``: the Ray driver decides)."""
        return Path(self.cfg.output_dir) / "checkpoint"

    def setup(self, module: LossModule, optimizer, scheduler):
        self.model, self.optimizer, self.scheduler = module.to(self.device), optimizer, scheduler
        return self.model

    def micro_step(self, boundary: bool):
        """Context around one micro-batch's forward and backward (DDP skips the all-reduce off boundaries)."""
        return nullcontext()

    def backward(self, loss: torch.Tensor, boundary: bool) -> None:
        (loss / self.cfg.grad_accum).backward()

    def step(self) -> None:
        """Called at each accumulation boundary."""
        if self.cfg.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def unwrap(self, wrapped) -> torch.nn.Module:
        """The plain model (what the method evaluates and saves)."""
        return wrapped.model

    def evaluation(self, method: Method, model) -> tuple[Method, torch.nn.Module]:
        """The (method, model) pair that evaluation predicts with: here the method and the plain model."""
        return method, self.unwrap(model)

    def average(self, value: float) -> float:
        """Mean of ``value`` over workers (also makes every rank take the same decision)."""
        return value

    def save_model(self, method: Method, model, folder: Path) -> None:
        """The consolidated export (safetensors + tokenizer + topro.json) that evaluation and serving load."""
        if self.is_main:
            method.save(self.unwrap(model), folder)

    def save_state(self, folder: Path) -> None:
        """Model, optimizer and scheduler state, for resuming."""
        torch.save({"model": self.unwrap(self.model).state_dict(), "optimizer": self.optimizer.state_dict(),
                    "scheduler": self.scheduler.state_dict()}, folder / "training_state.pt")

    def load_state(self, folder: Path) -> None:
        state = torch.load(folder / "training_state.pt", map_location=self.device, weights_only=True)
        self.unwrap(self.model).load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])

    def after_evaluation(self, state: "LoopState", record: dict[str, Any], *, improved: bool, method: Method,
                         model) -> None:
        """Keep the best model (Ray strategies also checkpoint and report here)."""
        if improved:
            self.save_model(method, model, self.export_dir)

    def export_averaged(self, state: "LoopState", record: dict[str, Any], *, method: Method, model) -> None:
        """Export the averaged weights (``selection: average_*``) in place of the best checkpoint."""
        self.save_model(method, model, self.export_dir)

    def step_hook(self, step: int) -> None:
        """Called after every optimizer step (fault injection in the Ray layer)."""


@dataclass
class LoopState:
    """What the loop needs to resume (``epoch``: the epoch to continue, ``step``: optimizer steps done)."""

    epoch: int = 0
    step: int = 0
    best_metric: float = -math.inf
    best_step: int = -1
    bad_evaluations: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    resumed_from_step: int | None = None


MLM_HEAD_METHODS = ("topro", "topro_soft")
"""Methods that score label words with the pretrained masked-LM head."""
PROMPTED_METHODS = ("topro", "topro_soft")
"""Methods that ask a templated question (and so record a template and verbalizer)."""


def method_spec(cfg: TrainConfig, model_path: str) -> MethodSpec:
    """The method's settings from the training config; only methods that ask a question record a template
    and verbalizer."""
    task = get_task(cfg.task)
    prompted = cfg.method in PROMPTED_METHODS
    return MethodSpec(method=cfg.method, task=task.name, labels=list(task.labels), base_model=cfg.model,
                      template=(cfg.template or task.default_template) if prompted else None,
                      verbalizer=(cfg.verbalizer or task.default_verbalizer) if prompted else None,
                      label_word_policy=cfg.label_word_policy, max_length=cfg.max_length,
                      base_model_path=model_path,
                      mlm_head_untrained=cfg.method in MLM_HEAD_METHODS and bool(mlm_head_untrained(model_path)),
                      long_sentences=cfg.long_sentences, window_stride=cfg.window_stride,
                      prompt_packing=cfg.prompt_packing, max_packed_length=cfg.max_packed_length,
                      prefix_length=cfg.prefix_length, prefix_dropout=cfg.prefix_dropout,
                      freeze_backbone=cfg.freeze_backbone, soft_prompt_placement=cfg.soft_prompt_placement)


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


def build_optimizer(cfg: TrainConfig, model: torch.nn.Module, total_steps: int):
    from transformers import get_linear_schedule_with_warmup

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, eps=cfg.adam_eps, weight_decay=cfg.weight_decay)
    warmup = int(cfg.warmup_ratio * total_steps)
    scheduler = get_linear_schedule_with_warmup(optimizer, warmup, max(total_steps, 1))
    return optimizer, scheduler


def epoch_batches(cfg: TrainConfig, lengths: list[int], epoch: int, rank: int, world_size: int,
                  sizes: list[int] | None = None) -> list[list[int]]:
    """This rank's micro-batches of ``epoch``: its slices of the global token-budget batches
    (``sizes``: what each example counts towards ``batch_size``, see ``Encoded.batch_units``)."""
    batches = token_budget_batches(lengths, cfg.max_tokens_per_batch, cfg.batch_size, shuffle=True,
                                   seed=cfg.seed + epoch, sizes=sizes)
    return split_batches(batches, rank, world_size)


def train(cfg: TrainConfig, strategy: LocalStrategy | None = None, resume_from: Path | None = None) -> dict[str, Any]:
    """Train ``cfg``; returns the metrics document (also written to ``output_dir/metrics.json``).

    ``resume_from``: a checkpoint folder written by ``strategy.save_state`` and
    ``save_loop_state``; training continues from its step.
    """
    from topro.quiet import quiet_stack

    quiet_stack(cfg.progress)
    strategy = strategy or LocalStrategy(cfg)
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    set_seed(cfg.seed)
    out_dir = Path(cfg.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
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
    train_sentences = load_split(task, cfg.train_lang, "train", cfg.data_dir, limit=cfg.max_train_sentences)
    dev_sentences = load_split(task, cfg.train_lang, "dev", cfg.data_dir, limit=cfg.max_dev_sentences)
    examples = method.encode(train_sentences)
    lengths = [e.length for e in examples]
    sizes = [e.batch_units for e in examples]

    # The number of batches depends only on the lengths, not on the epoch's shuffle.
    batches_per_epoch = len(epoch_batches(cfg, lengths, 0, strategy.rank, strategy.world_size, sizes))
    if batches_per_epoch == 0:
        raise ValueError(f"{len(examples)} training examples give no batch for {strategy.world_size} workers")
    # An optimizer step accumulates `grad_accum` micro-batches; an epoch with
    # fewer batches than that steps once on all of them (else no step would
    # ever be taken and gradients would pile up).
    accum = min(cfg.grad_accum, batches_per_epoch)
    if accum < cfg.grad_accum and strategy.is_main:
        log.warning("an epoch has %d batches, fewer than grad_accum=%d: each epoch takes one optimizer "
                    "step over its %d batches", batches_per_epoch, cfg.grad_accum, batches_per_epoch)
    steps_per_epoch = batches_per_epoch // accum
    total_steps = cfg.max_steps or steps_per_epoch * cfg.epochs
    check_selection(cfg, steps_per_epoch, getattr(strategy, "zero_stage", None))
    averager = CheckpointAverager(cfg.selection, cfg.k)
    base_model = method.build_model(model_path)
    if embeddings_frozen(cfg):
        freeze_input_embeddings(base_model)
    n_trainable, n_total = count_parameters(base_model)
    log.info("%s: %d trainable of %d parameters (%.3f%%)", method.name, n_trainable, n_total,
             100 * n_trainable / max(n_total, 1))
    module = LossModule(method, base_model)
    optimizer, scheduler = build_optimizer(cfg, module, total_steps)
    model = strategy.setup(module, optimizer, scheduler)
    device = strategy.device

    state = LoopState()
    if resume_from is not None:
        state = LoopState(**json.loads((Path(resume_from) / "loop_state.json").read_text()))
        strategy.load_state(Path(resume_from))
        state.resumed_from_step = state.step
        if strategy.is_main:
            log.info("resumed from step %d (epoch %d) of checkpoint %s", state.step, state.epoch, resume_from)

    n_train_words = sum(len(s) for s in train_sentences)
    summary: dict[str, Any] = {
        "config": to_dict(cfg), "model_path": model_path, "method": method.name,
        "n_train_sentences": len(train_sentences), "n_train_words": n_train_words,
        "n_train_examples": len(examples),
        "n_train_truncated_words": sum(e.truncated_words for e in examples),
        "n_train_trimmed_prompts": sum(len(e.words) * int(e.trimmed_context) for e in examples),
        "n_train_questions": sum(len(e.words) for e in examples), "n_train_tokens": sum(lengths),
        "n_dev_sentences": len(dev_sentences), "world_size": strategy.world_size,
        "selection_metric": selection,
        "mlm_head_untrained": bool(spec.mlm_head_untrained),
        "steps_per_epoch": steps_per_epoch, "batches_per_step": accum,
        "n_trainable_params": n_trainable, "n_total_params": n_total,
    }
    train_seconds, train_examples, train_tokens = 0.0, 0, 0

    def evaluate_and_keep(train_loss: float, epoch: int) -> bool:
        """Evaluate dev; keep the best; return True when early stopping says stop."""
        eval_method, eval_model = strategy.evaluation(method, model)
        dev = evaluate_sentences(eval_method, eval_model, task, dev_sentences, viterbi=cfg.viterbi, device=device,
                                 dtype=cfg.dtype, max_tokens=cfg.max_tokens_per_batch * 2,
                                 max_examples=cfg.batch_size * 4)
        # Every rank scores the same dev set; averaging makes their early-stopping decisions identical.
        metric = strategy.average(metric_value(dev, selection))
        record = {"epoch": epoch, "step": state.step, "train_loss": strategy.average(train_loss),
                  f"dev_{task.metric}": dev[task.metric], "dev_accuracy": dev["accuracy"],
                  f"dev_{selection}": metric}
        if task.scheme == "iob2":
            record["dev_f1_strict"] = dev["f1_strict"]
        if "viterbi" in dev:
            record["dev_viterbi_f1"] = dev["viterbi"]["f1"]
        state.history.append(record)
        averager.add(strategy.unwrap(model), state.step, metric)
        improved = metric > state.best_metric
        if improved:
            state.best_metric, state.best_step, state.bad_evaluations = metric, state.step, 0
        else:
            state.bad_evaluations += 1
        if strategy.is_main:
            log.info("epoch %d step %d: train loss %.4f, dev %s %.4f%s", epoch, state.step, record["train_loss"],
                     selection, metric, " (best)" if improved else "")
        strategy.after_evaluation(state, record, improved=improved, method=method, model=model)
        return state.bad_evaluations >= cfg.patience

    # A run resumed after it had decided to stop stops again.
    stop = state.bad_evaluations >= cfg.patience or bool(cfg.max_steps and state.step >= cfg.max_steps)
    # Without bars, a line at the first step (a trial shows signs of life at once), then every progress_every_s.
    next_line, line_prefix = 0.0, f"{cfg.run_name}: " if cfg.run_name else ""
    while state.epoch < cfg.epochs and not stop:
        batches = epoch_batches(cfg, lengths, state.epoch, strategy.rank, strategy.world_size, sizes)
        # Skip micro-batches already done in this epoch when resuming mid-epoch.
        skip = (state.step - state.epoch * steps_per_epoch) * accum
        model.train()
        running, n_loss = 0.0, 0
        bar = tqdm(total=min(len(batches), steps_per_epoch * accum),
                   desc=f"epoch {state.epoch + 1}/{cfg.epochs}",
                   disable=not (cfg.progress and strategy.is_main), initial=max(skip, 0))
        lines = bool(bar.disable and strategy.is_main and cfg.progress_every_s)
        for micro, batch_ids in enumerate(batches):
            if micro < skip:
                continue
            if micro >= steps_per_epoch * accum:
                break  # a remainder smaller than grad_accum is dropped: every step sees a full global batch
            start = time.perf_counter()
            chunk = [examples[i] for i in batch_ids]
            batch = {k: v.to(device) for k, v in method.collate(chunk).items()}
            boundary = (micro + 1) % accum == 0
            with strategy.micro_step(boundary):
                with autocast_for(device, cfg.dtype):
                    loss = model(batch)
                # Strategies divide by grad_accum; a shorter group still averages its batches.
                strategy.backward(loss * (cfg.grad_accum / accum) if accum != cfg.grad_accum else loss, boundary)
            if boundary:
                strategy.step()
                state.step += 1
            train_seconds += time.perf_counter() - start
            train_examples += len(chunk)
            train_tokens += sum(e.length for e in chunk)
            running += float(loss.detach())
            n_loss += 1
            bar.update(1)
            bar.set_postfix(loss=f"{running / n_loss:.4f}")
            if boundary:
                strategy.step_hook(state.step)
                if lines and time.perf_counter() >= next_line:
                    next_line = time.perf_counter() + cfg.progress_every_s
                    log.info("%sepoch %d/%d step %d/%d: loss %.4f, %.1f examples/s", line_prefix, state.epoch + 1,
                             cfg.epochs, state.step, total_steps, running / n_loss,
                             train_examples * strategy.world_size / max(train_seconds, 1e-9))
                if evaluation_due(cfg, state.step, steps_per_epoch):
                    stop = evaluate_and_keep(running / n_loss, state.epoch)
                    if stop:
                        break
                if cfg.max_steps and state.step >= cfg.max_steps:
                    stop = True
                    break
        bar.close()
        finished_epoch = state.epoch
        state.epoch += 1  # before the end-of-epoch evaluation: its checkpoint resumes at the next epoch
        if not (state.history and state.history[-1]["step"] == state.step):
            stop = evaluate_and_keep(running / max(n_loss, 1), finished_epoch) or stop

    averaged: dict[str, Any] = {"selection": cfg.selection}
    if averager.active:
        steps = averager.average_into(strategy.unwrap(model))
        averaged.update(k=cfg.k, averaged_steps=steps)
        if steps:
            if len(steps) < cfg.k and strategy.is_main:
                log.warning("selection %s: only %d of k=%d checkpoints to average (early stopping or a restart)",
                            cfg.selection, len(steps), cfg.k)
            eval_method, eval_model = strategy.evaluation(method, model)
            dev = evaluate_sentences(eval_method, eval_model, task, dev_sentences, viterbi=cfg.viterbi,
                                     device=device, dtype=cfg.dtype, max_tokens=cfg.max_tokens_per_batch * 2,
                                     max_examples=cfg.batch_size * 4)
            score = strategy.average(metric_value(dev, selection))
            averaged[f"averaged_dev_{selection}"] = score
            if strategy.is_main:
                log.info("selection %s: averaged the checkpoints of steps %s: dev %s %.4f (best single %.4f)",
                         cfg.selection, steps, selection, score, state.best_metric)
            strategy.export_averaged(state, {"epoch": state.epoch, "step": state.step, f"dev_{selection}": score,
                                             "averaged_steps": len(steps)}, method=method, model=model)

    # Throughput over all workers: they run in lockstep, so rank 0's time is the run's.
    all_examples = strategy.average(float(train_examples)) * strategy.world_size
    all_tokens = strategy.average(float(train_tokens)) * strategy.world_size
    summary.update({
        "best_step": state.best_step, f"best_dev_{selection}": state.best_metric,
        "history": state.history, "steps": state.step,
        "resumed_from_step": state.resumed_from_step,
        "train_seconds": train_seconds,
        "examples_per_second": all_examples / train_seconds if train_seconds else None,
        "tokens_per_second": all_tokens / train_seconds if train_seconds else None,
        "checkpoint": str(strategy.export_dir) if strategy.export_dir else None,
        **averaged,
    })
    if strategy.is_main:
        (out_dir / "metrics.json").write_text(json.dumps(summary, indent=2))
    return summary


def save_loop_state(state: LoopState, folder: Path) -> None:
    (folder / "loop_state.json").write_text(json.dumps(state.__dict__, indent=2))
