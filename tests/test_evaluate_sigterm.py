"""SIGTERM on ``topro evaluate`` (a real subprocess and signal): the languages done are kept, atomically, marked
partial; one line; exit 143."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from topro.cli import main

REPO = Path(__file__).resolve().parent.parent

# `topro evaluate`, announcing each language as it starts (and slowed so that a signal lands mid-run).
SCRIPT = """
import sys, time
from topro import evaluate
inner = evaluate.evaluate_language
def announced(*args, **kwargs):
    print("LANG", args[3], flush=True)
    time.sleep(1.0)
    return inner(*args, **kwargs)
evaluate.evaluate_language = announced
from topro.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_sigterm_keeps_the_languages_done(tmp_path, data_dir, tiny_udpos):
    run = tmp_path / "run"
    assert main(["train", "--config", "configs/train/udpos-vanilla.yaml", "--data-dir", str(data_dir), "--output",
                 str(run), "max_train_sentences=8", "max_dev_sentences=4", "epochs=1", "eval_langs=[]",
                 "progress=false"]) == 0
    output = tmp_path / "eval.json"
    env = {**os.environ, "PYTHONPATH": f"{REPO / 'platform'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT, "evaluate", "--checkpoint", str(run / "checkpoint"),
                             "--langs", "de,fr,ru,ar,zh", "--data-dir", str(data_dir), "--max-sentences", "5",
                             "--output", str(output)], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    started = [proc.stdout.readline().split() for _ in range(2)]  # the second language has started
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    line = err.strip().splitlines()[-1]
    assert line.startswith("topro evaluate: SIGTERM: evaluated 2 of 5 languages; kept them in "), line
    record = json.loads(output.read_text())
    assert record["partial"] is True and sorted(record["languages"]) == sorted(lang for _, lang in started)
    missing = record["languages_not_evaluated"]
    assert len(missing) == 3 and set(missing) | set(record["languages"]) == {"de", "fr", "ru", "ar", "zh"}
