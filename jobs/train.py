"""Ray job entry: train one model with Ray Train on the cluster the job runs in.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/train.py --config configs/train/udpos-topro-deepspeed.yaml workers=2

A submitted job joins its cluster through RAY_ADDRESS (Ray sets it); run by
hand without it, it starts a local Ray on 127.0.0.1. It does what ``topro
train`` does (train, then evaluate ``eval_langs`` on the best checkpoint) but
always on Ray Train (``strategy: local`` becomes DDP). Cluster nodes need topro installed
(the KubeRay image) or the job's working directory on their PYTHONPATH.
"""
import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))  # a checkout without an installed topro

from topro.cli import train_and_evaluate  # noqa: E402
from topro.config import TrainConfig, load_config  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--config", required=True, help="YAML training config (configs/train/*.yaml)")
parser.add_argument("--address", help="Ray address (default $RAY_ADDRESS, else a local Ray)")
parser.add_argument("overrides", nargs="*", help="key=value overrides of TrainConfig fields")
args = parser.parse_args()
summary = train_and_evaluate(load_config(TrainConfig, args.config, args.overrides), address=args.address, on_ray=True)
print(json.dumps({k: v for k, v in summary.items() if k not in ("config", "history")}, indent=2))
