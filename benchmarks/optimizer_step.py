"""One AdamW step over a model's parameters: torch's default (for-loop) kernel, foreach, and fused (what
``train.build_optimizer`` uses), side by side in one run.

    python benchmarks/optimizer_step.py --model ~/.cache/offline-models/multilingual-e5-small --threads 2

An optimizer step is a fixed cost per step, whatever the method's forward pass costs, so it bounds how much
faster a cheaper forward (packed ToPro) can make training.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(Path("~/.cache/offline-models/multilingual-e5-small").expanduser()))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=5)
    args = p.parse_args(argv)
    import torch
    from transformers import AutoModel

    torch.set_num_threads(args.threads)
    params = list(AutoModel.from_pretrained(args.model).parameters())
    print(f"{args.model}: {sum(x.numel() for x in params) / 1e6:.1f}M parameters in {len(params)} tensors, "
          f"{args.threads} threads, torch {torch.__version__}")
    generator = torch.Generator().manual_seed(0)
    for x in params:
        x.grad = torch.randn(x.shape, generator=generator) * 1e-3
    seconds = {}
    for name, options in (("default", {}), ("foreach", {"foreach": True}), ("fused", {"fused": True})):
        optimizer = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.01, **options)
        optimizer.step()  # allocates the moments
        start = time.perf_counter()
        for _ in range(args.steps):
            optimizer.step()
        seconds[name] = (time.perf_counter() - start) / args.steps
        print(f"{name:8s} {seconds[name]:.3f} s/step", flush=True)
    print(f"fused_speedup {seconds['default'] / seconds['fused']:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
