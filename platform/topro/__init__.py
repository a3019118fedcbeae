"""topro: prompt-based cross-lingual sequence labeling."""
__version__ = "0.1.0"

import os as _os
from pathlib import Path as _Path

# DeepSpeed (imported by transformers and the Ray strategies) warns "unable to detect" a GPU on every
# CPU-only import; CPU is what it picks anyway, so say so before it is imported (see topro.quiet).
if "DS_ACCELERATOR" not in _os.environ and not any(
        _Path(p).exists() for p in ("/dev/nvidiactl", "/dev/nvidia0", "/dev/kfd")):
    _os.environ["DS_ACCELERATOR"] = "cpu"
