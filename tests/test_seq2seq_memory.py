"""Seq2seq ToPro evaluation at mT5's vocabulary size keeps its memory bounded."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).with_name("seq2seq_memory.py")
BOUND_MIB = 400  # 64 prompts x 17 labels at 250k vocabulary: measured 122 MiB; all rows at once (before) 4162 MiB


@pytest.mark.slow  # a subprocess scoring at mT5's 250k vocabulary: half a minute
def test_seq2seq_scoring_memory_stays_bounded_at_mt5_vocabulary(tiny_mt5):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    out = subprocess.run([sys.executable, str(SCRIPT), tiny_mt5, "64"], env=env, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    print(out.stdout)
    found = re.search(r"peak_mib=([\d.]+) prompts=(\d+) labels=17", out.stdout)
    assert found, out.stdout
    assert int(found.group(2)) == 64
    assert float(found.group(1)) < BOUND_MIB, out.stdout
