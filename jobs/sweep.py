"""The main job: ``ray job submit -- python jobs/sweep.py --config configs/sweeps/<name>.yaml [key=value ...]``.

Same arguments as ``topro sweep``. Inside ``ray job submit`` it joins the cluster the job runs on
($RAY_ADDRESS); run directly, it starts a local Ray. Needs topro installed (``pip install -e .``).
"""
import sys

from topro.cli import main

if __name__ == "__main__":
    sys.exit(main(["sweep", *sys.argv[1:]]))
