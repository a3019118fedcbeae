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
        if path and path.startswith((os.path.realpath(data_dir), os.path.realpath(root))):  # ../shared may be a link
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



def test_tiny_model_is_the_same_on_every_build_and_knows_every_character_of_its_corpus(tmp_path, data_dir, monkeypatch):
    """Two builds (two caches) give the same vocabulary, ids and weights: HF's WordPieceTrainer did not (ties
    broken in hash order), so every machine trained the tests on another tiny model. No corpus word is [UNK]."""
    import hashlib

    import torch
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    from topro.data.loading import load_split
    from topro.models import build_tiny_model

    root = tmp_path / "data"
    (root / "udpos").mkdir(parents=True)
    for name in ("train-en.tsv", "train-ja.tsv"):
        os.symlink(data_dir / "udpos" / name, root / "udpos" / name)
    folders = []
    for cache in ("a", "b"):
        monkeypatch.setenv("TOPRO_CACHE", str(tmp_path / cache))
        folders.append(build_tiny_model("udpos", str(root)))
    assert folders[0] != folders[1]
    digests = {hashlib.sha256((f / "tokenizer.json").read_bytes()).hexdigest() for f in folders}
    assert len(digests) == 1
    # Tensors, not file bytes: safetensors writes its metadata (the tied-weight aliases) in set order.
    weights = [load_file(f / "model.safetensors") for f in folders]
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    tok = AutoTokenizer.from_pretrained(folders[0])
    words = [w for lang in ("en", "ja") for s in load_split("udpos", lang, "train", str(root), limit=400)
             for w in s.words]
    ids = tok(words, is_split_into_words=True, add_special_tokens=False)["input_ids"]
    assert tok.unk_token_id not in ids and len(ids) < 3 * len(words)  # subwords, not characters


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


def test_tiny_model_built_on_a_ddp_rank_other_than_0_is_whole_and_never_publishes_half_a_folder(
        tmp_path, data_dir, monkeypatch):
    """transformers 5's save_pretrained writes model files on torch.distributed rank 0 only: a rank-1 builder
    once published a tokenizer-only folder that every later run failed to load ("Should have a `model_type`
    key"). Every rank now writes the whole folder: rank 0's files and weights."""
    import torch
    import transformers.distributed.mixin as mixin
    from safetensors.torch import load_file

    from topro.models import build_tiny_model

    monkeypatch.setenv("TOPRO_CACHE", str(tmp_path / "rank0"))
    rank0 = build_tiny_model("udpos", str(data_dir))
    monkeypatch.setenv("TOPRO_CACHE", str(tmp_path / "rank1"))
    target = tmp_path / "rank1" / rank0.name
    target.mkdir(parents=True)
    (target / "tokenizer.json").write_text("{}")  # half a folder, as the old code published it
    monkeypatch.setattr(mixin, "_is_torch_distributed_initialized", lambda: True)
    monkeypatch.setattr(mixin, "_get_torch_distributed_rank", lambda: 1)
    folder = build_tiny_model("udpos", str(data_dir))
    assert folder == target and (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()
    names = sorted(p.name for p in rank0.iterdir())
    assert sorted(p.name for p in folder.iterdir()) == names
    assert (folder / "config.json").read_text() == (rank0 / "config.json").read_text()
    mine, theirs = load_file(folder / "model.safetensors"), load_file(rank0 / "model.safetensors")
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)  # rank 0's weights
    assert not [p for p in (tmp_path / "rank1").iterdir() if p.name.startswith(".tiny-")]  # no leftovers

    # A complete builder (rank 0, or one process) repairs a half folder left by an older topro.
    monkeypatch.undo()
    monkeypatch.setenv("TOPRO_CACHE", str(tmp_path / "repair"))
    broken = tmp_path / "repair" / rank0.name
    broken.mkdir(parents=True)
    (broken / "tokenizer.json").write_text("{}")
    assert (build_tiny_model("udpos", str(data_dir)) / "model.safetensors").is_file()
