"""The training loop: one function that runs alone or inside a Ray Train worker.

Scale-out differences (DDP, DeepSpeed, checkpoint reporting, resumption) live
behind ``Strategy``; ``LocalStrategy`` is the single-process one. The loop
evaluates English dev after every epoch (and every ``eval_every_steps``),
keeps the best checkpoint, stops early after ``patience`` evaluations without
gain, and writes ``metrics.json``.
"""
from __future__ import annotations

import json
import logging
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from topro.batching import shard_batches, token_budget_batches
from topro.config import TrainConfig, to_dict
from topro.data import get_task, load_split
from topro.evaluate import autocast_for, evaluate_sentences
from topro.methods import Method, MethodSpec, build_method
from topro.methods.base import count_parameters
from topro.models import load_tokenizer, pick_device, resolve_model_path

log = logging.getLogger(__name__)


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class LocalStrategy:
    """Single process: plain AdamW steps with gradient accumulation and clipping."""

    rank = 0
    world_size = 1

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.device = pick_device(cfg.device)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def setup(self, model, optimizer, scheduler):
        self.model, self.optimizer, self.scheduler = model.to(self.device), optimizer, scheduler
        return self.model

    def backward(self, loss: torch.Tensor, boundary: bool) -> None:
        (loss / self.cfg.grad_accum).backward()

    def step(self) -> None:
        """Called at each accumulation boundary."""
        if self.cfg.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def unwrap(self, model):
        return model

    def save_model(self, method: Method, model, folder: Path) -> None:
        if self.is_main:
            method.save(self.unwrap(model), folder)

    def save_state(self, folder: Path) -> None:
        """Optimizer and scheduler state, for resuming."""
        torch.save({"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()},
                   folder / "training_state.pt")

    def load_state(self, folder: Path) -> None:
        state = torch.load(folder / "training_state.pt", map_location="cpu", weights_only=True)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])

    def after_evaluation(self, state: "LoopState", metrics: dict[str, Any], checkpoint: Path | None) -> None:
        """Hook for reporting (Ray Train reports metrics and checkpoints here)."""

    def step_hook(self, step: int) -> None:
        """Called after every optimizer step (fault injection in the Ray layer)."""


@dataclass
class LoopState:
    """What the loop needs to resume."""

    epoch: int = 0
    step: int = 0
    best_metric: float = -math.inf
    best_step: int = -1
    bad_evaluations: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    resumed_from_step: int | None = None


def method_spec(cfg: TrainConfig, model_path: str) -> MethodSpec:
    task = get_task(cfg.task)
    return MethodSpec(method=cfg.method, task=task.name, labels=list(task.labels), base_model=cfg.model,
                      template=cfg.template or task.default_template,
                      verbalizer=cfg.verbalizer or task.default_verbalizer,
                      label_word_policy=cfg.label_word_policy, max_length=cfg.max_length,
                      extra={"prefix_length": cfg.prefix_length, "prefix_dropout": cfg.prefix_dropout,
                             "freeze_backbone": cfg.freeze_backbone,
                             "soft_prompt_placement": cfg.soft_prompt_placement, "base_model_path": model_path})


def build_optimizer(cfg: TrainConfig, model: torch.nn.Module, total_steps: int):
    from transformers import get_linear_schedule_with_warmup

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, eps=cfg.adam_eps, weight_decay=cfg.weight_decay)
    warmup = int(cfg.warmup_ratio * total_steps)
    scheduler = get_linear_schedule_with_warmup(optimizer, warmup, max(total_steps, 1))
    return optimizer, scheduler


def train(cfg: TrainConfig, strategy: LocalStrategy | None = None, resume_from: Path | None = None) -> dict[str, Any]:
    """Train ``cfg``; returns the metrics document (also written to ``output_dir/metrics.json``)."""
    strategy = strategy or LocalStrategy(cfg)
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    set_seed(cfg.seed)
    out_dir = Path(cfg.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    task = get_task(cfg.task)
    model_path = resolve_model_path(cfg.model, task.name, cfg.data_dir)
    tokenizer = load_tokenizer(model_path)
    method = build_method(method_spec(cfg, model_path), model_path, tokenizer)
    train_sentences = load_split(task, cfg.train_lang, "train", cfg.data_dir, limit=cfg.max_train_sentences)
    dev_sentences = load_split(task, cfg.train_lang, "dev", cfg.data_dir, limit=cfg.max_dev_sentences)
    examples = method.encode(train_sentences)
    lengths = [e.length for e in examples]

    model = method.build_model(model_path)
    n_trainable, n_total = count_parameters(model)
    log.info("%s: %d trainable of %d parameters (%.3f%%)", method.name, n_trainable, n_total,
             100 * n_trainable / max(n_total, 1))
    batches_per_epoch = len(shard_batches(
        token_budget_batches(lengths, cfg.max_tokens_per_batch, cfg.batch_size, shuffle=True, seed=cfg.seed),
        strategy.rank, strategy.world_size))
    steps_per_epoch = max(1, batches_per_epoch // cfg.grad_accum)
    total_steps = cfg.max_steps or steps_per_epoch * cfg.epochs
    optimizer, scheduler = build_optimizer(cfg, model, total_steps)
    model = strategy.setup(model, optimizer, scheduler)
    device = strategy.device

    state = LoopState()
    if resume_from is not None:
        state = LoopState(**json.loads((resume_from / "loop_state.json").read_text()))
        strategy.load_state(resume_from)
        state.resumed_from_step = state.step
        log.info("resumed from step %d (epoch %d)", state.step, state.epoch)

    best_dir = out_dir / "checkpoint"
    n_train_words = sum(len(s) for s in train_sentences)
    summary: dict[str, Any] = {
        "config": to_dict(cfg), "model_path": model_path, "method": method.name,
        "n_train_sentences": len(train_sentences), "n_train_words": n_train_words,
        "n_train_examples": len(examples),
        "n_train_truncated_words": sum(e.truncated_words for e in examples),
        "n_train_trimmed_prompts": sum(int(e.trimmed_context) for e in examples),
        "n_dev_sentences": len(dev_sentences), "world_size": strategy.world_size,
        "steps_per_epoch": steps_per_epoch,
        "n_trainable_params": n_trainable, "n_total_params": n_total,
    }
    train_seconds, train_examples, train_tokens = 0.0, 0, 0

    def evaluate_and_keep(train_loss: float) -> bool:
        """Evaluate dev; save the best; return True when early stopping says stop."""
        dev = evaluate_sentences(method, strategy.unwrap(model), task, dev_sentences, viterbi=cfg.viterbi,
                                 device=device, dtype=cfg.dtype, max_tokens=cfg.max_tokens_per_batch * 2,
                                 max_examples=cfg.batch_size * 4)
        metric = dev[task.metric]
        record = {"epoch": state.epoch, "step": state.step, "train_loss": train_loss,
                  f"dev_{task.metric}": metric, "dev_accuracy": dev["accuracy"]}
        if "viterbi" in dev:
            record["dev_viterbi_f1"] = dev["viterbi"]["f1"]
        state.history.append(record)
        improved = metric > state.best_metric
        checkpoint = None
        if improved:
            state.best_metric, state.best_step, state.bad_evaluations = metric, state.step, 0
            strategy.save_model(method, model, best_dir)
            checkpoint = best_dir
        else:
            state.bad_evaluations += 1
        if strategy.is_main:
            log.info("epoch %d step %d: train loss %.4f, dev %s %.4f%s", state.epoch, state.step, train_loss,
                     task.metric, metric, " (best)" if improved else "")
        strategy.after_evaluation(state, record, checkpoint)
        return state.bad_evaluations >= cfg.patience

    stop = False
    while state.epoch < cfg.epochs and not stop:
        epoch_batches = shard_batches(
            token_budget_batches(lengths, cfg.max_tokens_per_batch, cfg.batch_size, shuffle=True,
                                 seed=cfg.seed + state.epoch),
            strategy.rank, strategy.world_size)
        # Skip micro-batches already done in this epoch when resuming mid-epoch.
        skip = (state.step - state.epoch * steps_per_epoch) * cfg.grad_accum if resume_from else 0
        resume_from = None
        model.train()
        running, n_loss = 0.0, 0
        bar = tqdm(total=len(epoch_batches), desc=f"epoch {state.epoch + 1}/{cfg.epochs}",
                   disable=not (cfg.progress and strategy.is_main), initial=max(skip, 0))
        for micro, batch_ids in enumerate(epoch_batches):
            if micro < skip:
                continue
            if micro >= steps_per_epoch * cfg.grad_accum:
                break  # a remainder smaller than grad_accum is dropped: every step sees a full global batch
            start = time.perf_counter()
            chunk = [examples[i] for i in batch_ids]
            batch = {k: v.to(device) for k, v in method.collate(chunk).items()}
            with autocast_for(device, cfg.dtype):
                loss = method.loss(model, batch)
            boundary = (micro + 1) % cfg.grad_accum == 0
            strategy.backward(loss, boundary)
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
                if cfg.eval_every_steps and state.step % cfg.eval_every_steps == 0:
                    stop = evaluate_and_keep(running / n_loss)
                    if stop:
                        break
                if cfg.max_steps and state.step >= cfg.max_steps:
                    stop = True
                    break
        bar.close()
        if not (cfg.eval_every_steps and state.history and state.history[-1]["step"] == state.step):
            stop = evaluate_and_keep(running / max(n_loss, 1)) or stop
        state.epoch += 1

    summary.update({
        "best_step": state.best_step, f"best_dev_{task.metric}": state.best_metric,
        "history": state.history, "steps": state.step, "resumed_from_step": state.resumed_from_step,
        "train_seconds": train_seconds,
        "examples_per_second": train_examples / train_seconds if train_seconds else None,
        "tokens_per_second": train_tokens / train_seconds if train_seconds else None,
        "checkpoint": str(best_dir),
    })
    if strategy.is_main:
        (out_dir / "metrics.json").write_text(json.dumps(summary, indent=2))
    return summary


def save_loop_state(state: LoopState, folder: Path) -> None:
    (folder / "loop_state.json").write_text(json.dumps(state.__dict__, indent=2))
