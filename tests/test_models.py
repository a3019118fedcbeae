"""The built-in tiny model: no evaluation text in its tokenizer; MLM-head detection of pretrained folders."""
import builtins
import io
import os
import pathlib

import pytest


def test_tiny_tokenizer_reads_train_splits_only(tmp_path, data_dir, monkeypatch):
    """Every file opened while ``tiny`` is built is a train split: dev and test text never shapes it."""
    from topro.models import build_tiny_model

    root = tmp_path / "data"
    (root / "udpos").mkdir(parents=True)
    for name in ("train-en.tsv", "train-ja.tsv", "dev-en.tsv", "dev-de.tsv", "dev-ja.tsv"):
        os.symlink(data_dir / "udpos" / name, root / "udpos" / name)
    (root / "udpos" / "test-th.tsv").write_text("a\tNOUN\n")
    monkeypatch.setenv("TOPRO_CACHE", str(tmp_path / "cache"))
    opened = []
    real_open, real_path_open, real_io_open = builtins.open, pathlib.Path.open, io.open

    def note(file):
        path = os.path.realpath(os.fspath(file)) if isinstance(file, (str, os.PathLike)) else None
        if path and (path.startswith(str(data_dir)) or path.startswith(str(root))):
            opened.append(os.path.basename(path))

    def spy_open(file, *a, **k):
        note(file)
        return real_open(file, *a, **k)

    def spy_path_open(self, *a, **k):
        note(self)
        return real_path_open(self, *a, **k)

    monkeypatch.setattr(builtins, "open", spy_open)
    monkeypatch.setattr(io, "open", spy_open)
    monkeypatch.setattr(pathlib.Path, "open", spy_path_open)
    folder = build_tiny_model("udpos", str(root))
    monkeypatch.undo()
    assert (folder / "config.json").is_file() and str(folder).startswith(str(tmp_path / "cache"))
    assert sorted(set(opened)) == ["train-en.tsv", "train-ja.tsv"]  # read, and nothing else


def test_mlm_head_detection(tiny_udpos, tiny_xlmr, tmp_path):
    from topro.models import mlm_head_untrained

    assert mlm_head_untrained(tiny_udpos) is False  # BertForMaskedLM: cls.predictions.*
    assert mlm_head_untrained(tiny_xlmr) is False  # XLMRobertaForMaskedLM: lm_head.*
    from transformers import AutoModel

    AutoModel.from_pretrained(tiny_udpos).save_pretrained(tmp_path / "encoder")  # an encoder, as e5 is published
    assert mlm_head_untrained(str(tmp_path / "encoder")) is True
    assert mlm_head_untrained("no/such-model") is None


def test_topro_on_an_encoder_without_mlm_head_warns_and_flags(tmp_path, tiny_udpos, data_dir, caplog):
    import json

    from transformers import AutoModel, AutoTokenizer

    from topro.config import TrainConfig, load_config
    from topro.evaluate import evaluate_checkpoint
    from topro.train import train

    encoder = tmp_path / "encoder"
    AutoModel.from_pretrained(tiny_udpos).save_pretrained(encoder)
    AutoTokenizer.from_pretrained(tiny_udpos).save_pretrained(encoder)
    cfg = load_config(TrainConfig, None, ["task=udpos", "method=topro", f"model={encoder}", "max_train_sentences=8",
                                          "max_dev_sentences=4", "epochs=1", "progress=false",
                                          f"output_dir={tmp_path / 'run'}", f"data_dir={data_dir}"])
    with caplog.at_level("WARNING", logger="topro.train"):
        summary = train(cfg)
    assert any("no masked-LM head" in r.getMessage() for r in caplog.records)
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["mlm_head_untrained"] is True
    record = evaluate_checkpoint(summary["checkpoint"], "de", data_dir=str(data_dir), max_sentences=3,
                                 progress=False)
    assert record["mlm_head_untrained"] is True
