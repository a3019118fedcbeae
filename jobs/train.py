"""Ray job entry: train one model with Ray Train on the cluster the job runs in (``topro train --on-ray``).

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/train.py --config configs/train/udpos-topro-deepspeed.yaml workers=2

Same arguments as ``topro train``, always on Ray Train (``strategy: local`` becomes DDP); it joins the job's
cluster through RAY_ADDRESS (Ray sets it), or run by hand without it starts a local Ray on 127.0.0.1.
Cluster nodes need topro installed (the KubeRay image, or ``pip install -e .``).
"""
import sys

from topro.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", "--on-ray", *sys.argv[1:]]))
