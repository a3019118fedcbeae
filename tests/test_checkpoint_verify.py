"""Verified checkpoints: topro.json records each weight file's size and sha256; every load checks them and a
damaged checkpoint stops with one line (evaluate, serving's Tagger, ``topro verify``)."""
from __future__ import annotations

import json
import logging
import os
import shutil

import pytest

from topro.checkpoint_files import RECORD_KEY, CheckpointDamaged, sha256_of
from topro.cli import main


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_dir):
    out = tmp_path_factory.mktemp("verify") / "run"
    assert main(["train", "--config", "configs/train/udpos-vanilla.yaml", "--data-dir", str(data_dir), "--output",
                 str(out), "max_train_sentences=16", "max_dev_sentences=8", "epochs=1", "eval_langs=[]",
                 "progress=false"]) == 0
    return out


def copy_of(trained, tmp_path):
    folder = tmp_path / "ckpt"
    shutil.copytree(trained / "checkpoint", folder)  # follows the link: a plain copy of the current version
    return folder


def test_the_export_is_a_link_to_a_version_and_records_its_weights(trained, capsys):
    link = trained / "checkpoint"
    assert link.is_symlink() and os.readlink(link) == "checkpoint.v1"
    record = json.loads((link / "topro.json").read_text())[RECORD_KEY]
    weights = link / "model.safetensors"
    assert record["model.safetensors"] == {"bytes": weights.stat().st_size, "sha256": sha256_of(weights)}
    assert main(["verify", str(link)]) == 0
    assert "1 weight file(s) match their recorded size and sha256" in capsys.readouterr().out


def evaluate(folder, tmp_path, data_dir):
    return main(["evaluate", "--checkpoint", str(folder), "--langs", "de", "--data-dir", str(data_dir),
                 "--max-sentences", "3", "--output", str(tmp_path / "eval.json")])


def test_truncated_weights_stop_evaluate_with_one_line(trained, tmp_path, data_dir, capsys):
    folder = copy_of(trained, tmp_path)
    weights = folder / "model.safetensors"
    size = weights.stat().st_size
    os.truncate(weights, size // 2)
    assert evaluate(folder, tmp_path, data_dir) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0, err
    assert f"model.safetensors has {size // 2} bytes, topro.json records {size} (truncated)" in err
    assert "Traceback" not in err and not (tmp_path / "eval.json").exists()


def test_a_flipped_bit_is_found_by_the_hash_and_by_the_serving_tagger(trained, tmp_path, capsys):
    from topro.serving import Tagger

    folder = copy_of(trained, tmp_path)
    weights = folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointDamaged, match="model.safetensors has sha256 .* records .*corrupted bytes"):
        Tagger.load(str(folder), device="cpu")
    assert main(["verify", str(folder), "hashes=false"]) == 0  # the size alone cannot see it
    assert main(["verify", str(folder)]) == 2
    assert "corrupted bytes" in capsys.readouterr().err


def test_a_checkpoint_without_the_record_loads_with_a_note(trained, tmp_path, caplog):
    from topro.methods import load_checkpoint

    folder = copy_of(trained, tmp_path)
    meta = json.loads((folder / "topro.json").read_text())
    del meta[RECORD_KEY]
    (folder / "topro.json").write_text(json.dumps(meta))
    with caplog.at_level(logging.INFO, logger="topro.checkpoint_files"):
        method, model = load_checkpoint(folder)
    assert "records no weight-file sizes and hashes (written by an older topro): loaded unverified" in caplog.text
    assert method.name == "vanilla"


@pytest.mark.slow  # the registry fixture trains a ToPro checkpoint and builds an MLflow store
def test_a_damaged_registered_model_is_refused_by_alias(trained, tmp_path, model_registry, capsys):
    """A registry alias resolves to a downloaded copy; the same check stops it (evaluate, serve, verify)."""
    import mlflow

    from topro.tracking import register_checkpoint

    folder = copy_of(trained, tmp_path)
    weights = folder / "model.safetensors"
    os.truncate(weights, weights.stat().st_size - 100)
    with mlflow.start_run(run_name="damaged") as run:
        mlflow.log_artifacts(str(folder), "checkpoint")
    register_checkpoint(run.info.run_id, "topro-udpos-damaged", "champion")
    assert main(["verify", "models:/topro-udpos-damaged@champion", "--tracking-uri", model_registry["uri"]]) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]  # after MLflow's download bar
    assert line.startswith("topro verify: error: checkpoint ") and "model.safetensors has" in line
    assert "(truncated)" in line
