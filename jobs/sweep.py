"""The main job: ``ray job submit -- python jobs/sweep.py --config configs/sweeps/<name>.yaml [key=value ...]``.

Same arguments as ``topro sweep``. Inside ``ray job submit`` it joins the
cluster the job runs on ($RAY_ADDRESS); run directly, it starts a local Ray.
"""
import sys
from pathlib import Path

try:
    import topro  # noqa: F401  (installed, or on PYTHONPATH)
except ImportError:  # a plain checkout: use its platform/ folder
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "platform"))

from topro.cli import main

if __name__ == "__main__":
    sys.exit(main(["sweep", *sys.argv[1:]]))
