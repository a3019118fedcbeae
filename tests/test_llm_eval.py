"""End to end: `topro eval-llm` on real XTREME sentences with a tiny causal LM,
sequential and as a Ray fan-out, the JSON record and the MLflow run."""
import json

import pytest

from llm_tiny import tiny_model_dir
from topro.llm.backends import HFBackend
from topro.cli import main
from topro.llm.evaluate import LLMEvalConfig, evaluate_llm


@pytest.fixture(scope="module")
def model_path():
    return str(tiny_model_dir("gemma3"))


@pytest.fixture(scope="module")
def backend(model_path):
    # float64: the equivalences asserted here (e.g. calibration's shift within 1e-5 on log-probs of ~-40)
    # then hold on any CPU and thread count; float32 rounding alone reached 1.1e-5 with OMP_NUM_THREADS=1
    return HFBackend(model_path, threads=1, dtype="fp64")


def test_cli_writes_record_and_mlflow_run(model_path, tmp_path, monkeypatch, capsys):
    import mlflow

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    out = tmp_path / "udpos.json"
    code = main(["eval-llm", "--task", "udpos", "--model", model_path, "--langs", "de,en", "--max-sentences", "2",
                 "--shots", "2", "--no-ray", "--threads", "1", "--tracking-uri", uri, "--output", str(out)])
    assert code == 0
    err = capsys.readouterr().err  # a line per language as it finishes, with the rate and what is left
    assert "eval-llm: de done (1/2 languages, " in err and " sentences/s, ETA " in err
    assert "eval-llm: en done (2/2 languages, " in err
    record = json.loads(out.read_text())
    assert record["method"] == "llm-topro-score-2shot" and record["metric"] == "accuracy"
    de = record["languages"]["de"]
    assert de["n_sentences"] == 2 and de["n_words"] > 0 and de["format_failure_rate"] == 0.0
    assert {"accuracy", "xtreme_seqeval_f1", "model_tokens", "n_truncated_words"} <= set(de)
    assert len(record["params"]["demos"]) == 2
    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(experiment_names=["topro-llm"], output_format="list")
    assert len(runs) == 1
    metrics = runs[0].data.metrics
    assert {"accuracy.de", "accuracy.en", "format_failure_rate.de", "accuracy.avg"} <= set(metrics)
    assert runs[0].data.params["shots"] == "2"
    artifacts = mlflow.artifacts.list_artifacts(run_id=runs[0].info.run_id)
    assert [a.path for a in artifacts] == ["udpos.json"]


def test_topro_cli_registers_eval_llm():
    from topro.cli import build_parser

    args = build_parser().parse_args(["eval-llm", "--task", "panx", "--model", "m", "--mode", "generate"])
    assert args.mode == "generate" and args.func.__module__ == "topro.cli.eval_llm"


@pytest.mark.parametrize("fmt,mode", [("sentence", "generate"), ("sentence", "score"), ("topro", "generate")])
def test_other_formats_and_modes_report_failures(backend, model_path, fmt, mode):
    cfg = LLMEvalConfig(task="panx", model=model_path, format=fmt, mode=mode, shots=1, max_sentences=2,
                        max_new_tokens=8)
    r = evaluate_llm(cfg, ["de"], backend)["languages"]["de"]
    # The rate is the failed words over the words scored (not merely a number in [0, 1]).
    assert r["format_failure_rate"] == pytest.approx(r["format_failed_words"] / r["n_words"], abs=1e-12) and "f1" in r
    if mode == "score":
        assert r["format_failure_rate"] == 0.0 and "viterbi" in r
    else:
        # A random tiny model answers nonsense: the failures are counted, with reasons.
        assert r["format_failed_words"] == sum(r["format_failure_reasons"].values())


def test_ray_fan_out_matches_sequential(backend, model_path, ray_local):
    from topro.cluster.llm_eval import evaluate_llm_parallel

    cfg = LLMEvalConfig(task="panx", model=model_path, shots=1, max_sentences=2)
    # float64 on both sides: the scores then agree whatever order each process sums in
    sequential = evaluate_llm(cfg, ["de", "en"], backend)
    parallel = evaluate_llm_parallel(cfg, ["de", "en"], {"threads": 1, "dtype": "fp64"}, cpus_per_task=1)
    for lang in ("de", "en"):
        assert parallel["languages"][lang]["f1"] == sequential["languages"][lang]["f1"]
        assert parallel["languages"][lang]["accuracy"] == sequential["languages"][lang]["accuracy"]
    assert parallel["method"] == sequential["method"] == "llm-topro-score-1shot"


def test_calibration_removes_the_label_prior(backend, model_path):
    from topro.llm.evaluate import _score_topro, prepare
    from topro.data import load_split

    plain = LLMEvalConfig(task="panx", model=model_path, max_sentences=2)
    calibrated = LLMEvalConfig(task="panx", model=model_path, max_sentences=2, calibrate=True)
    assert calibrated.method == "llm-topro-score-0shot-calibrated"
    setup = prepare(plain)
    sentences = load_split("panx", "de", "dev", limit=2)
    a = _score_topro(backend, setup, plain, sentences)
    b = _score_topro(backend, setup, calibrated, sentences)
    # Per sentence, every word's label scores move by the same prior vector
    # (up to each row's normaliser).
    for x, y in zip(a, b):
        shift = x.log_probs - y.log_probs
        shift = shift - shift[:, :1]
        assert shift.shape == (len(x.tags), 7)
        assert abs(shift - shift[0]).max() < 1e-5 and abs(shift[0]).max() > 1e-3


def test_llm_evaluation_refuses_a_split_with_hidden_gold_labels(backend, model_path, tmp_path):
    from topro.data.readers import DataFormatError
    from topro.llm.evaluate import evaluate_llm_language

    (tmp_path / "panx").mkdir()
    (tmp_path / "panx" / "test-de.tsv").write_text("Angela\tO\nMerkel\tO\n\nin\tO\nBerlin\tO\n")
    cfg = LLMEvalConfig(task="panx", model=model_path, split="test", data_dir=str(tmp_path))
    with pytest.raises(DataFormatError, match=r"test-de.tsv: every gold label .* is 'O' .*hidden"):
        evaluate_llm_language(backend, cfg, "de")
