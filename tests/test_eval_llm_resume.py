"""`topro eval-llm` loses nothing to a stop: the results file is written after every language (partial until
the last), SIGTERM drops only the language under way, and the same command run again evaluates only the
languages missing, to the record an uninterrupted run writes. Real subprocesses, signals and a tiny Gemma 3."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest

from llm_tiny import tiny_model_dir
from slowdown import REPO, slowed_env
from topro.config import ConfigError
from topro.partial_results import kept_languages

LANGS = ["de", "fr", "ru", "ar", "zh"]
# A second per sentence (the whole-sentence format scores one sentence at a time), so a signal lands mid-language.
SLOW_SENTENCES = "topro.llm.evaluate:_score_sentence=1"


def eval_llm(model: str, data_dir, output, *extra: str) -> list[str]:
    return [sys.executable, "-m", "topro.cli", "eval-llm", "--task", "udpos", "--model", model, "--langs",
            ",".join(LANGS), "--data-dir", str(data_dir), "--max-sentences", "3", "--format", "sentence",
            "--mode", "score", "--threads", "1", "--no-mlflow", "--output", str(output), *extra]


def run_until(cmd: list[str], env: dict, marker: str, delay: float = 0.0) -> tuple[int, str]:
    """Run ``cmd``, send SIGTERM ``delay`` seconds after ``marker`` is on its stderr; (exit code, stderr)."""
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen = []
    for line in proc.stderr:
        seen.append(line)
        if marker in line:
            break
    else:
        raise AssertionError("".join(seen)[-3000:])
    time.sleep(delay)
    proc.send_signal(signal.SIGTERM)
    _, rest = proc.communicate(timeout=300)
    return proc.returncode, "".join(seen) + rest


def finished(err: str) -> list[str]:
    """The languages a run's progress lines say it finished ("eval-llm: de done (1/5 languages, ...")."""
    return [line.split("eval-llm: ")[1].split()[0] for line in err.splitlines() if " languages, " in line]


def scores(record: dict) -> dict:
    """What must not depend on being stopped and resumed (not the seconds)."""
    keys = ("accuracy", "n_words", "n_sentences", "predicted_label_counts", "format_failure_rate")
    return {lang: {k: r[k] for k in keys} for lang, r in record["languages"].items()}


@pytest.mark.slow
def test_sigterm_keeps_the_languages_done_and_the_rerun_evaluates_only_the_rest(tmp_path, data_dir):
    model = str(tiny_model_dir("gemma3"))
    output = tmp_path / "llm.json"
    code, err = run_until(eval_llm(model, data_dir, output, "--no-ray"),
                          slowed_env(tmp_path / "hooks", SLOW_SENTENCES), " done (2/5 languages",
                          delay=1.5)  # the third language is at its second of three sentences (a second each)
    assert code == 128 + signal.SIGTERM, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    done = finished(err)
    assert done == LANGS[:2]
    assert f"stopped: {LANGS[2]} dropped (it was under way)" in err  # an hour on a CPU: not finished first
    line = err.strip().splitlines()[-1]
    assert line.startswith(f"topro eval-llm: SIGTERM: evaluated 2 of 5 languages; kept them in {output} "
                           f"(partial: true); rerun the same command to resume ("), line
    partial = json.loads(output.read_text())
    assert partial["partial"] is True and sorted(partial["languages"]) == sorted(done)
    assert partial["languages_not_evaluated"] == LANGS[2:]

    # Other settings are refused before the model loads, naming what differs; the file is left as it was.
    other = subprocess.run(eval_llm(model, data_dir, output, "--no-ray", "--shots", "1"), cwd=REPO,
                           env=slowed_env(tmp_path / "hooks", None), capture_output=True, text=True, timeout=300)
    assert other.returncode == 2, other.stderr[-3000:]
    assert "holds a stopped `topro eval-llm` run with other settings (shots: 0 there, 1 now)" in other.stderr
    assert json.loads(output.read_text()) == partial

    resumed = subprocess.run(eval_llm(model, data_dir, output, "--no-ray"), cwd=REPO,
                             env=slowed_env(tmp_path / "hooks", None), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"eval-llm: resuming {output}: 2 of 5 languages kept (de, fr), 3 to evaluate" in resumed.stderr
    assert finished(resumed.stderr) == LANGS[2:]
    record = json.loads(output.read_text())
    assert "partial" not in record and sorted(record["languages"]) == sorted(LANGS)
    assert {lang: record["languages"][lang] for lang in done} == partial["languages"]  # kept as they were

    fresh = tmp_path / "fresh.json"
    whole = subprocess.run(eval_llm(model, data_dir, fresh, "--no-ray"), cwd=REPO,
                           env=slowed_env(tmp_path / "hooks", None), capture_output=True, text=True, timeout=300)
    assert whole.returncode == 0, whole.stderr[-3000:]
    uninterrupted = json.loads(fresh.read_text())
    assert scores(record) == scores(uninterrupted)
    assert record["average"]["accuracy"] == pytest.approx(uninterrupted["average"]["accuracy"], abs=1e-12)
    assert record["params"] == uninterrupted["params"]


@pytest.mark.slow
def test_sigterm_on_the_ray_fan_out_keeps_the_languages_finished_and_cancels_the_rest(tmp_path, data_dir):
    model = str(tiny_model_dir("gemma3"))
    output = tmp_path / "llm.json"
    code, err = run_until(eval_llm(model, data_dir, output, "--cpus-per-task", "1"),
                          slowed_env(tmp_path / "hooks", SLOW_SENTENCES), " done (1/5 languages")
    assert code == 128 + signal.SIGTERM, err[-3000:]
    assert "Traceback" not in err.split("SIGTERM")[-1], err[-3000:]
    cancelled = int(err.split("stopped: ")[1].split()[0])  # the Ray tasks under way
    done = finished(err)
    assert cancelled >= 1 and 1 <= len(done) and len(done) + cancelled <= 5
    line = err.strip().splitlines()[-1]
    assert line.startswith(f"topro eval-llm: SIGTERM: evaluated {len(done)} of 5 languages; kept them in "
                           f"{output} (partial: true)"), line
    record = json.loads(output.read_text())
    assert record["partial"] is True and sorted(record["languages"]) == sorted(done)
    assert all(record["languages"][lang]["n_sentences"] == 3 for lang in done)  # no half-scored language
    assert set(record["languages_not_evaluated"]) == set(LANGS) - set(done)

    rerun = subprocess.run(eval_llm(model, data_dir, output, "--cpus-per-task", "1"), cwd=REPO,
                           env=slowed_env(tmp_path / "hooks", None), capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"resuming {output}: {len(done)} of 5 languages kept" in rerun.stderr
    assert sorted(finished(rerun.stderr)) == sorted(set(LANGS) - set(done))  # only those went to Ray tasks
    resumed = json.loads(output.read_text())
    assert "partial" not in resumed and sorted(resumed["languages"]) == sorted(LANGS)
    assert {lang: resumed["languages"][lang] for lang in done} == record["languages"]


def write(path, record: dict) -> None:
    path.write_text(json.dumps(record))


def test_kept_languages_only_from_a_stopped_run_of_the_same_command_and_settings(tmp_path):
    output = tmp_path / "r.json"
    settings = {"shots": 3, "format": "topro", "max_sentences": None, "langs": ("de",)}
    assert kept_languages(output, writer="topro eval-llm", settings=settings) == {}  # nothing there
    languages = {"de": {"accuracy": 0.5}}
    stopped = {"written_by": "topro eval-llm", "partial": True, "languages": languages,
               "resume_settings": json.loads(json.dumps(settings))}
    write(output, stopped)
    assert kept_languages(output, writer="topro eval-llm", settings=settings) == languages
    assert kept_languages(output, writer="topro evaluate", settings=settings) == {}  # another command's file
    write(output, {**stopped, "partial": False})
    assert kept_languages(output, writer="topro eval-llm", settings=settings) == {}  # complete: run again
    write(output, stopped)
    with pytest.raises(ConfigError, match=r"other settings \(max_sentences: None there, 100 now; "
                                          r"shots: 3 there, 0 now\); rerun with its settings"):
        kept_languages(output, writer="topro eval-llm", settings={**settings, "shots": 0, "max_sentences": 100})
    other = {**settings, "shots": 0}
    assert kept_languages(output, writer="topro eval-llm", settings=other, overwrite=True) == {}  # start over
    # The same settings resume even with overwrite: the scores would be the same, and the one line a stop prints
    # ("rerun the same command to resume") must hold for a command that had --overwrite.
    assert kept_languages(output, writer="topro eval-llm", settings=settings, overwrite=True) == languages
    output.write_text("{ not json")  # a half-written file from before atomic writes: not resumed, not fatal
    assert kept_languages(output, writer="topro eval-llm", settings=settings) == {}


def test_kept_languages_bring_back_their_predictions_or_are_evaluated_again(tmp_path):
    output = tmp_path / "r.json"
    write(output, {"written_by": "topro evaluate", "partial": True, "resume_settings": {},
                   "languages": {"de": {"f1": 0.5}, "fr": {"f1": 0.4}}, "predictions_file": "r.predictions.json"})
    write(tmp_path / "r.predictions.json", {"languages": {"de": [{"gold": ["O"], "pred": ["O"]}]}})
    kept = kept_languages(output, writer="topro evaluate", settings={}, predictions_file=True)
    assert kept == {"de": {"f1": 0.5, "predictions": [{"gold": ["O"], "pred": ["O"]}]}}  # fr: predictions lost


def test_a_stopped_runs_file_is_not_complete(tmp_path):
    from topro.partial_results import is_complete

    output = tmp_path / "r.json"
    assert not is_complete(output)  # absent
    write(output, {"languages": {"de": {}}, "partial": True})
    assert not is_complete(output)  # what the benchmarks' reruns resume instead of reusing
    write(output, {"languages": {"de": {}}})
    assert is_complete(output)
    output.write_text("[1, 2")
    assert not is_complete(output)
