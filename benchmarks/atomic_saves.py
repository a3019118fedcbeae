"""What atomic, verified checkpoints cost: one export written in place (as before topro.atomic) against the
staged, fsynced, hashed and published one (``LocalStrategy.export``); the resumable state ``RUN/state``; and
checking a checkpoint on load (sizes only, and sha256), in one run on one filesystem.

    python benchmarks/atomic_saves.py --model ~/.cache/offline-models/multilingual-e5-small --repeats 3
    python benchmarks/atomic_saves.py --model tiny

Reports the median seconds of ``--repeats`` saves each. Writes into ``--folder`` (default: a temporary folder
under the current directory, i.e. the filesystem runs write to), removed afterwards.
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path


def median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(Path("~/.cache/offline-models/multilingual-e5-small").expanduser()))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--folder", default=".")
    args = p.parse_args(argv)
    import torch

    from topro.checkpoint_files import verify_checkpoint
    from topro.config import TrainConfig
    from topro.train import (LocalStrategy, LoopState, MethodModule, build_optimizer, embeddings_frozen,
                             freeze_input_embeddings, method_spec)
    from topro.methods import build_method
    from topro.models import load_tokenizer, resolve_model_path

    torch.set_num_threads(2)
    cfg = TrainConfig(task="udpos", method="vanilla", model=args.model)
    path = resolve_model_path(cfg.model, cfg.task)
    method = build_method(method_spec(cfg, path), path, load_tokenizer(path))
    model = method.build_model(path)
    if embeddings_frozen(cfg):  # as prepare() does: pretrained models train without their word embeddings
        freeze_input_embeddings(model)
    module = MethodModule(method, model)
    optimizer, scheduler = build_optimizer(cfg, module, 10)
    module(method.collate(method.encode(__import__("topro.data", fromlist=["x"]).load_split(
        "udpos", "en", "train", limit=2)))).backward()
    optimizer.step()  # optimizer state exists, as in a run
    root = Path(tempfile.mkdtemp(prefix="atomic-saves-", dir=args.folder))
    try:
        cfg.output_dir = str(root / "run")
        strategy = LocalStrategy(cfg)
        strategy.wrap(module, optimizer, scheduler)
        in_place = root / "in-place"

        def before():  # what train.py did: Method.save straight into RUN/checkpoint
            shutil.rmtree(in_place, ignore_errors=True)
            method.save(module.model, in_place)

        export = median_seconds(before, args.repeats)
        atomic_export = median_seconds(strategy.export, args.repeats)
        state = median_seconds(lambda: strategy.save_resumable(LoopState()), args.repeats)
        ckpt = Path(cfg.output_dir) / "checkpoint"
        size = sum(f.stat().st_size for f in ckpt.iterdir() if f.is_file())
        sizes = median_seconds(lambda: verify_checkpoint(ckpt, hashes=False), args.repeats)
        hashes = median_seconds(lambda: verify_checkpoint(ckpt, hashes=True), args.repeats)
        state_size = sum(f.stat().st_size for f in (Path(cfg.output_dir) / "state").iterdir())
        print(f"{args.model}: export {size / 1e6:.0f} MB, state {state_size / 1e6:.0f} MB (word embeddings "
              f"{'frozen' if embeddings_frozen(cfg) else 'trained'}), median of {args.repeats}")
        print(f"| what | seconds |\n|---|---|\n| export in place (before) | {export:.3f} |\n"
              f"| export staged + fsync + sha256 record + link swap (now) | {atomic_export:.3f} |\n"
              f"| resumable state RUN/state | {state:.3f} |\n| verify on load: sizes | {sizes:.4f} |\n"
              f"| verify on load: sizes + sha256 | {hashes:.3f} |")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
