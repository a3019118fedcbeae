"""End to end on real data and the tiny model: ``topro train`` then ``topro evaluate``."""
import json

import pytest
from safetensors.torch import load_file

from topro.cli import main
from topro.data import get_task
from topro.metrics import score_task


@pytest.mark.parametrize("task,method", [("udpos", "topro"), ("panx", "vanilla")])
def test_train_then_evaluate(tmp_path, data_dir, task, method, capsys):
    out = tmp_path / "run"
    code = main(["train", "--config", f"configs/train/{task}-{method}.yaml", "--data-dir", str(data_dir),
                 "--output", str(out), "max_train_sentences=40", "max_dev_sentences=20", "epochs=2",
                 "eval_langs=[]", "progress=false", "learning_rate=1e-3"])
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert len(metrics["history"]) == 2 and metrics["n_train_sentences"] == 40
    assert (out / "checkpoint" / "model.safetensors").is_file()
    load_file(out / "checkpoint" / "model.safetensors")  # safetensors, no pickle
    langs = "de,ru" if task == "udpos" else "de,el"
    result = tmp_path / "eval.json"
    code = main(["evaluate", "--checkpoint", str(out / "checkpoint"), "--langs", langs, "--data-dir", str(data_dir),
                 "--max-sentences", "15", "--output", str(result)])
    assert code == 0
    record = json.loads(result.read_text())
    assert record["task"] == task and record["method"] == method
    metric = "accuracy" if task == "udpos" else "f1"
    predictions = json.loads((tmp_path / "eval.predictions.json").read_text())
    for lang in langs.split(","):
        r = record["languages"][lang]
        assert r["n_sentences"] == 15 and r["n_truncated_words"] == 0
        # The reported score is the one its own per-sentence predictions give (not merely a number in [0, 1]).
        stored = predictions["languages"][lang]
        assert r[metric] == pytest.approx(score_task(get_task(task), stored["gold"], stored["pred"])[metric], abs=1e-12)
    assert set(record["average"]) >= {metric, "n_languages"}
    if task == "panx":
        assert "viterbi" in record["languages"]["de"] and "f1_strict" in record["languages"]["de"]
    assert metrics["selection_metric"] == metric and f"best_dev_{metric}" in metrics
    assert record["split"] == "dev"  # no test files here, hub offline: dev (UDPOS would default to test)
    assert record["predictions_file"] == "eval.predictions.json"
    de = predictions["languages"]["de"]
    assert len(de["gold"]) == len(de["pred"]) == len(de["digests"]) == 15


def test_bad_override_exits_with_named_error(capsys):
    assert main(["train", "--config", "configs/train/udpos-topro.yaml", "lerning_rate=1"]) == 2
    assert "unknown key 'lerning_rate'" in capsys.readouterr().err


def test_freeze_embeddings_keeps_the_word_vectors_and_trains_the_rest(tmp_path, data_dir, tiny_udpos):
    """``freeze_embeddings=true``: word vectors leave training unchanged, the encoder moves, counts say so."""
    runs = {}
    for freeze in ("true", "false"):
        out = tmp_path / freeze
        assert main(["train", "--config", "configs/train/udpos-topro.yaml", "--data-dir", str(data_dir),
                     "--output", str(out), "max_train_sentences=10", "max_dev_sentences=5", "epochs=1",
                     "max_steps=2", "eval_langs=[]", "progress=false", "learning_rate=1e-2",
                     f"freeze_embeddings={freeze}"]) == 0
        runs[freeze] = (json.loads((out / "metrics.json").read_text()),
                        load_file(out / "checkpoint" / "model.safetensors"))
    base = load_file(f"{tiny_udpos}/model.safetensors")
    key = next(k for k in base if k.endswith("word_embeddings.weight"))
    layer = next(k for k in base if "encoder.layer.0" in k and k.endswith("dense.weight"))
    frozen_metrics, frozen = runs["true"]
    trained_metrics, trained = runs["false"]
    assert (frozen[key] == base[key]).all()
    assert not (trained[key] == base[key]).all()
    assert not (frozen[layer] == base[layer]).all()
    assert trained_metrics["n_trainable_params"] - frozen_metrics["n_trainable_params"] == base[key].numel()
