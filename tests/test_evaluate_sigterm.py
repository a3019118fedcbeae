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
    predictions = json.loads(output.with_name("eval.predictions.json").read_text())["languages"]
    assert sorted(predictions) == sorted(record["languages"])  # written beside it, language by language

    # The same command again evaluates only the languages missing; those kept stay as they were.
    rerun = subprocess.run([sys.executable, "-m", "topro.cli", "evaluate", "--checkpoint", str(run / "checkpoint"),
                            "--langs", "de,fr,ru,ar,zh", "--data-dir", str(data_dir), "--max-sentences", "5",
                            "--output", str(output)], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    kept = sorted(record["languages"])
    assert f"evaluate: resuming {output}: 2 of 5 languages kept ({', '.join(kept)})" in rerun.stderr
    assert sorted(line.split("evaluate: ")[1].split()[0] for line in rerun.stderr.splitlines()
                  if " languages, " in line) == sorted(missing)
    resumed = json.loads(output.read_text())
    assert "partial" not in resumed and sorted(resumed["languages"]) == ["ar", "de", "fr", "ru", "zh"]
    assert {lang: resumed["languages"][lang] for lang in kept} == record["languages"]
    predictions_after = json.loads(output.with_name("eval.predictions.json").read_text())["languages"]
    assert sorted(predictions_after) == sorted(resumed["languages"])
    assert {lang: predictions_after[lang] for lang in kept} == predictions


# Each language takes 4 s more in the Ray actors (see slowdown.py): two actors, five languages.
SLOW_LANGUAGES = "topro.evaluate:evaluate_language=4"


@pytest.mark.slow
def test_sigterm_on_a_parallel_evaluation_keeps_the_languages_finished_and_cancels_the_rest(
        tmp_path, data_dir, tiny_udpos):
    from slowdown import slowed_env

    run = tmp_path / "run"
    assert main(["train", "--config", "configs/train/udpos-vanilla.yaml", "--data-dir", str(data_dir), "--output",
                 str(run), "max_train_sentences=8", "max_dev_sentences=4", "epochs=1", "eval_langs=[]",
                 "progress=false"]) == 0
    output = tmp_path / "eval.json"
    proc = subprocess.Popen([sys.executable, "-m", "topro.cli", "evaluate", "--checkpoint", str(run / "checkpoint"),
                             "--langs", "de,fr,ru,ar,zh", "--data-dir", str(data_dir), "--max-sentences", "5",
                             "--output", str(output), "--parallel"], cwd=REPO,
                            env=slowed_env(tmp_path / "hooks", SLOW_LANGUAGES), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    seen = []
    for line in proc.stderr:  # LanguageProgress: "evaluate: de done (1/5 languages, ..."
        seen.append(line)
        if " done (2/5 languages" in line:
            break
    else:
        raise AssertionError("".join(seen)[-3000:])
    proc.send_signal(signal.SIGTERM)
    _, rest = proc.communicate(timeout=300)
    err = "".join(seen) + rest
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    done = [line.split("evaluate: ")[1].split()[0] for line in err.splitlines() if " languages, " in line]
    line = err.strip().splitlines()[-1]
    assert line.startswith(f"topro evaluate: SIGTERM: evaluated {len(done)} of 5 languages (those under way were "
                           f"cancelled); kept them in {output} (partial: true); rerun the same command"), line
    assert "Traceback" not in rest, rest[-3000:]
    cancelled = int(err.split("stopped: ")[1].split()[0])  # the Ray tasks under way, killed with their actors
    assert cancelled >= 1 and len(done) + cancelled <= 5
    record = json.loads(output.read_text())
    assert record["partial"] is True and sorted(record["languages"]) == sorted(done) and 2 <= len(done) < 5
    missing = record["languages_not_evaluated"]
    assert set(missing) | set(done) == {"de", "fr", "ru", "ar", "zh"} and not set(missing) & set(done)
    # What was kept is what a full evaluation scores for those languages (no half-written language).
    assert all(record["languages"][lang]["n_sentences"] == 5 for lang in done)

    rerun = subprocess.run([sys.executable, "-m", "topro.cli", "evaluate", "--checkpoint", str(run / "checkpoint"),
                            "--langs", "de,fr,ru,ar,zh", "--data-dir", str(data_dir), "--max-sentences", "5",
                            "--output", str(output), "--parallel"], cwd=REPO, env=slowed_env(tmp_path / "hooks", None),
                           capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"evaluate: resuming {output}: {len(done)} of 5 languages kept" in rerun.stderr
    assert f" done (1/{5 - len(done)} languages" in rerun.stderr  # only the missing ones go to the actors
    resumed = json.loads(output.read_text())
    assert "partial" not in resumed and sorted(resumed["languages"]) == ["ar", "de", "fr", "ru", "zh"]
    assert {lang: resumed["languages"][lang] for lang in done} == record["languages"]
