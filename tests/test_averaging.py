"""selection: best | average_last_k | average_top_k (checkpoint weight averaging into the export)."""
import json

import pytest
import torch
from safetensors.torch import load_file

from topro.averaging import CheckpointAverager, check_selection, planned_evaluations
from topro.config import ConfigError, TrainConfig, load_config


def test_averager_keeps_last_or_top_k_and_averages_in_float64():
    model = torch.nn.Linear(3, 2, dtype=torch.float64)
    model.bias.requires_grad_(False)  # frozen parameters are not snapshotted (the same in every checkpoint)
    for selection, scores, want in [("average_last_k", [0.1, 0.9, 0.2, 0.3], [2, 3, 4]),
                                    ("average_top_k", [0.1, 0.9, 0.2, 0.3], [2, 3, 4]),
                                    ("average_top_k", [0.5, 0.9, 0.1, 0.6], [1, 2, 4])]:
        averager = CheckpointAverager(selection, 3)
        weights = []
        for step, score in enumerate(scores, start=1):
            with torch.no_grad():
                model.weight.fill_(float(step))
            weights.append(float(step))
            averager.add(model, step, score)
        assert all(set(s.weights) == {"weight"} for s in averager.kept)
        assert averager.average_into(model) == want
        assert torch.equal(model.weight, torch.full((2, 3), sum(want) / 3, dtype=torch.float64))


def test_k_larger_than_the_checkpoints_kept_is_refused_by_name():
    cfg = TrainConfig(selection="average_last_k", k=4, epochs=3)
    assert planned_evaluations(cfg, steps_per_epoch=10) == 3
    with pytest.raises(ConfigError, match=r"k: 4 is larger than the 3 English-dev checkpoints this run keeps"):
        check_selection(cfg, 10)
    check_selection(TrainConfig(selection="average_last_k", k=4, epochs=1, eval_every_steps=2), 10)  # 5 evaluations
    with pytest.raises(ConfigError, match="k: must be at least 1"):
        check_selection(TrainConfig(selection="average_top_k", k=0), 10)
    with pytest.raises(ConfigError, match="ZeRO-3"):
        check_selection(TrainConfig(selection="average_top_k", k=1), 10, zero_stage=3)
    check_selection(TrainConfig(selection="best", k=99), 10)  # k unused


def test_single_process_run_exports_the_average_of_its_last_k_checkpoints(tmp_path, data_dir, tiny_udpos):
    from topro.methods import load_checkpoint
    from topro.train import train

    def run(name, *extra):
        cfg = load_config(TrainConfig, None, ["task=udpos", "method=vanilla", "model=tiny", "max_train_sentences=48",
                                              "max_dev_sentences=10", "epochs=1", "eval_every_steps=1",
                                              "batch_size=16", "learning_rate=1e-3", "progress=false", "patience=10",
                                              f"output_dir={tmp_path / name}", f"data_dir={data_dir}", *extra])
        return train(cfg)

    best = run("best")
    averaged = run("avg", "selection=average_last_k", "k=2")
    assert best["selection"] == "best" and "averaged_steps" not in best
    assert averaged["averaged_steps"] == [averaged["steps"] - 1, averaged["steps"]]
    assert "averaged_dev_accuracy" in averaged
    # Same seed and data: the runs are the same until the export; the exported weights differ.
    assert [h["dev_accuracy"] for h in best["history"]] == [h["dev_accuracy"] for h in averaged["history"]]
    a = load_file(tmp_path / "best" / "checkpoint" / "model.safetensors")
    b = load_file(tmp_path / "avg" / "checkpoint" / "model.safetensors")
    assert any(not torch.equal(a[n], b[n]) for n in a)
    method, model = load_checkpoint(tmp_path / "avg" / "checkpoint", torch.device("cpu"))
    from topro.data import load_split
    from topro.evaluate import evaluate_sentences

    dev = evaluate_sentences(method, model, "udpos", load_split("udpos", "en", "dev", data_dir, limit=10))
    assert dev["accuracy"] == pytest.approx(averaged["averaged_dev_accuracy"])  # the export is the averaged model
    assert json.loads((tmp_path / "avg" / "metrics.json").read_text())["selection"] == "average_last_k"


def test_evals_per_epoch_spreads_evaluations_evenly_whatever_the_step_count():
    from topro.averaging import evaluation_due

    # ToPro (one example per word) and vanilla (one per sentence) get the same number of checkpoints.
    for steps_per_epoch in (7, 110):
        cfg = TrainConfig(epochs=2, evals_per_epoch=3)
        due = [s for s in range(1, 2 * steps_per_epoch + 1) if evaluation_due(cfg, s, steps_per_epoch)]
        assert len(due) == 6 and due[2] == steps_per_epoch and due[-1] == 2 * steps_per_epoch
        assert planned_evaluations(cfg, steps_per_epoch) == 6
    # Fewer steps than evaluations: one evaluation per step, never two at the same step.
    assert planned_evaluations(TrainConfig(epochs=1, evals_per_epoch=5), 2) == 2
    check_selection(TrainConfig(selection="average_last_k", k=3, epochs=1, evals_per_epoch=3), 5)
    with pytest.raises(ConfigError, match="evals_per_epoch"):
        load_config(TrainConfig, None, ["evals_per_epoch=2", "eval_every_steps=5"])
    with pytest.raises(ConfigError, match="evals_per_epoch"):
        load_config(TrainConfig, None, ["evals_per_epoch=0"])
