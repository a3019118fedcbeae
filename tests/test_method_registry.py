"""One method registry: names, classes by import path and traits, read by config, precheck, methods and docs."""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from topro.config import ConfigError, TrainConfig, load_config
from topro.method_registry import METHOD_REGISTRY, MethodEntry, traits_table
from topro.methods.topro_mlm import ToProMLM

REPO = Path(__file__).resolve().parent.parent


class ToyToPro(ToProMLM):
    """A method added in a test: ToPro under its own name and traits (no packing), to count what adding
    one touches: this class, the registry line in the test below, and the test."""

    name = "toy_topro"


TOY = MethodEntry("toy_topro", f"{__name__}:ToyToPro", prompted=True, head="pretrained_mlm")


def test_the_docs_show_the_registry():
    assert traits_table() in (REPO / "docs" / "architecture.md").read_text()


def test_configs_and_prechecks_read_the_registry_without_torch():
    code = ("import sys; import topro.config, topro.precheck, topro.method_registry; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


def test_every_entry_names_a_class_of_its_method():
    for entry in METHOD_REGISTRY.values():
        for encoder_decoder in (False, True):
            assert entry.implementation(encoder_decoder).name == entry.name


def test_method_spec_takes_every_field_it_shares_with_the_train_config(tiny_udpos):
    from topro.methods import MethodSpec, method_spec

    cfg = TrainConfig(method="topro_soft", model=tiny_udpos, template="topro", verbalizer="topro", max_length=77,
                      label_word_policy="first_piece", long_sentences="truncate", window_stride=9,
                      prompt_packing="sentence", max_packed_length=300, packed_word_bias=0.5, prefix_length=3,
                      prefix_dropout=0.25, freeze_backbone=False, soft_prompt_placement="prefix")
    spec = method_spec(cfg, tiny_udpos)
    shared = [f.name for f in dataclasses.fields(MethodSpec) if hasattr(cfg, f.name)]
    assert len(shared) == 31  # 15 + RoSPrompt's 8 + label_subword, adapter, 4 lora_* + llm_format, answer_end_scored
    assert {name: getattr(spec, name) for name in shared} == {name: getattr(cfg, name) for name in shared}
    assert (spec.base_model, spec.base_model_path, spec.labels[:2]) == (tiny_udpos, tiny_udpos, ["ADJ", "ADP"])
    assert method_spec(TrainConfig(method="vanilla", model=tiny_udpos), tiny_udpos).template is None  # not prompted


@pytest.mark.slow
def test_a_method_added_in_a_test_trains_saves_loads_and_evaluates_through_the_cli(monkeypatch, tmp_path,
                                                                                   data_dir):
    from topro.cli import main

    monkeypatch.setitem(METHOD_REGISTRY, TOY.name, TOY)  # the registry line
    with pytest.raises(ConfigError, match=r"method 'toy_topro' cannot pack prompts"):  # config reads its traits
        load_config(TrainConfig, None, ["method=toy_topro", "prompt_packing=sentence"])
    out = tmp_path / "run"
    assert main(["train", "--config", str(REPO / "configs/train/udpos-topro.yaml"), "--data-dir", str(data_dir),
                 "--output", str(out), "method=toy_topro", "model=tiny", "max_train_sentences=20", "max_dev_sentences=10", "epochs=1",
                 "max_length=64", "eval_langs=[]", "progress=false"]) == 0
    meta = json.loads((out / "checkpoint" / "topro.json").read_text())
    assert (meta["method"], meta["template"], meta["verbalizer"]) == ("toy_topro", "topro", "topro")  # prompted
    result = tmp_path / "eval.json"
    assert main(["evaluate", "--checkpoint", str(out / "checkpoint"), "--langs", "en,de", "--data-dir",
                 str(data_dir), "--max-sentences", "5", "--output", str(result)]) == 0
    record = json.loads(result.read_text())
    assert record["method"] == "toy_topro" and set(record["languages"]) == {"en", "de"}
    assert all(0 <= r["accuracy"] <= 1 and r["n_sentences"] == 5 for r in record["languages"].values())


def test_register_method_still_adds_a_third_party_method(tiny_udpos):
    from topro.methods import METHODS, MethodSpec, build_method, register_method
    from topro.methods.vanilla import Vanilla
    from topro.precheck import check_names

    register_method("third_party", lambda spec, tokenizer, model_path: Vanilla(spec, tokenizer))
    try:
        check_names(TrainConfig(method="third_party"))
        method = build_method(MethodSpec(method="third_party", task="udpos", labels=["X"], base_model="tiny"),
                              tiny_udpos)
        assert isinstance(method, Vanilla)
        assert not METHOD_REGISTRY["third_party"].prompted  # no traits given: none
    finally:
        METHODS.pop("third_party")
        METHOD_REGISTRY.pop("third_party")
    with pytest.raises(ConfigError, match="unknown method 'third_party'"):
        check_names(TrainConfig(method="third_party"))
