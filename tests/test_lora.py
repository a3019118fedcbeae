"""LoRA (``adapter: lora``) through PEFT on every kind of backbone, single process; Ray Train DDP and DeepSpeed
ZeRO-2 in ``test_lora_under_ray_train`` (slow)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from llm_tiny import tiny_model_dir
from topro.config import TrainConfig
from topro.data import load_split
from topro.methods import load_checkpoint

TINY_RUN = dict(task="udpos", max_train_sentences=8, max_dev_sentences=4, epochs=1, batch_size=4, max_steps=3,
                learning_rate=1e-2, max_length=32, progress=False, adapter="lora", lora_r=4, seed=3)


def model_path(kind: str, request) -> str:
    if kind in ("tiny", "mt5"):
        return request.getfixturevalue({"tiny": "tiny_udpos", "mt5": "tiny_mt5"}[kind])
    return str(tiny_model_dir(kind))


def merged_equals_adapters(checkpoint: Path, merged: Path, data_dir) -> float:
    """Largest difference of label log-probs (float64) between a LoRA checkpoint and its merged export."""
    sentences = load_split("udpos", "de", "dev", data_dir, limit=4)
    out = []
    for folder in (checkpoint, merged):
        method, model = load_checkpoint(folder)
        with torch.no_grad():
            out.append(method.label_log_probs(model.double(), method.collate(method.encode(sentences))))
    assert out[0].shape == out[1].shape and out[0].shape[0] == sum(len(s) for s in sentences)
    return float((out[0] - out[1]).abs().max())


@pytest.mark.parametrize("kind,method", [("llama", "vanilla"), ("gemma3", "vanilla"), ("tiny", "vanilla"),
                                         ("tiny", "topro"), ("tiny", "topro_soft"), ("mt5", "topro"),
                                         ("gemma3", "topro"), ("llama", "topro_soft")])
def test_lora_trains_adapters_and_head_only_and_merges_exactly(kind, method, tmp_path, data_dir, request):
    from safetensors import safe_open

    from topro.cli.export import ExportConfig, export_merged
    from topro.train import LocalStrategy, fit, prepare, set_seed

    extra = {"freeze_backbone": False} if method == "topro_soft" else {}  # soft ToPro fine-tuning its backbone
    if kind in ("llama", "gemma3") and method != "vanilla":
        extra["max_length"] = 256  # a causal prompt holds the sentence, its question and the label words
    if kind == "gemma3" and method == "topro":
        extra["prompt_packing"] = "sentence"  # as the backbone study trains it (llama's soft ToPro: per word)
    cfg = TrainConfig(method=method, model=model_path(kind, request), data_dir=str(data_dir),
                      output_dir=str(tmp_path / "run"), **{**TINY_RUN, **extra})
    strategy = LocalStrategy(cfg)
    set_seed(cfg.seed)
    run = prepare(cfg, strategy)
    model = run.module.model
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    adapters = {n for n in trained if ".lora_A." in n or ".lora_B." in n}
    # what trains beside the adapters: vanilla's fresh head, soft ToPro's prompt (tiny has its MLM head)
    heads = {"vanilla": {"classifier.weight", "classifier.bias"}, "topro": set(), "topro_soft": {"soft_prompt"}}[method]
    assert adapters and trained == adapters | heads
    fit(run, strategy)
    after = dict(model.named_parameters())
    frozen = [n for n in before if n not in trained]
    assert all(torch.equal(before[n], after[n]) for n in frozen)  # base weights bit-identical
    assert all(not torch.equal(before[n], after[n]) for n in adapters)  # every adapter matrix moved
    checkpoint = tmp_path / "run" / "checkpoint"
    with safe_open(str(checkpoint / "trained.safetensors"), "pt") as f:
        assert set(f.keys()) == trained  # adapters and head only
    meta = json.loads((checkpoint / "topro.json").read_text())
    assert meta["adapter"] == "lora" and meta["backbone_fingerprint"] and meta["n_trainable_params"] < \
        meta["n_total_params"] / 10
    export_merged(ExportConfig(merge=str(checkpoint), output=str(tmp_path / "merged")))
    assert json.loads((tmp_path / "merged" / "topro.json").read_text())["adapter"] == "none"
    assert merged_equals_adapters(checkpoint, tmp_path / "merged", data_dir) < 1e-5


def test_lora_checkpoint_refuses_another_backbone(tmp_path, data_dir):
    from topro.train import train

    llama = str(tiny_model_dir("llama"))
    train(TrainConfig(method="vanilla", model=llama, data_dir=str(data_dir), output_dir=str(tmp_path / "run"),
                      **{**TINY_RUN, "max_steps": 1}))
    checkpoint = tmp_path / "run" / "checkpoint"
    meta = json.loads((checkpoint / "topro.json").read_text())
    gemma = str(tiny_model_dir("gemma3"))
    (checkpoint / "topro.json").write_text(json.dumps({**meta, "base_model": gemma, "base_model_path": gemma}))
    with pytest.raises((FileNotFoundError, ValueError), match="its backbone could not be loaded|fingerprint"):
        load_checkpoint(checkpoint)


def test_gradient_checkpointing_gives_the_same_loss_and_gradients(data_dir):
    from topro.methods import MethodSpec, build_method
    from topro.data import get_task
    from topro.train import enable_gradient_checkpointing

    path = str(tiny_model_dir("gemma3"))
    spec = MethodSpec(method="vanilla", task="udpos", labels=list(get_task("udpos").labels), base_model=path,
                      adapter="lora", lora_r=4)
    method = build_method(spec, path)
    batch = method.collate(method.encode(load_split("udpos", "en", "dev", data_dir, limit=4)))
    results = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = method.build_model(path).double().train()
        if checkpointing:
            enable_gradient_checkpointing(model)
        torch.manual_seed(1)  # the same dropout masks
        loss = method.loss(model, batch)
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}))
    assert results[1][0] == pytest.approx(float(results[0][0]), abs=1e-12)
    assert results[0][1].keys() == results[1][1].keys()
    for name, grad in results[0][1].items():
        torch.testing.assert_close(results[1][1][name], grad, atol=1e-12, rtol=1e-10)


def test_export_refuses_a_full_checkpoint_and_a_busy_output(tmp_path, untrained_checkpoint):
    from topro.cli import main

    full = untrained_checkpoint("udpos", "vanilla")
    assert main(["export", "--merge", str(full), "--output", str(tmp_path / "out")]) == 2
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "x").write_text("x")
    assert main(["export", f"merge={full}", "--output", str(busy)]) == 2
    assert main(["export", "--output", str(tmp_path / "out")]) == 2  # merge is required


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "deepspeed"])
def test_lora_under_ray_train(strategy, tmp_path, data_dir, tiny_udpos, ray_local):
    """Two Ray Train workers (DDP, or DeepSpeed ZeRO-2): base weights bit-identical in the trained state,
    adapters moved, and the merged export scores as adapters + base."""
    from topro.cli.export import ExportConfig, export_merged
    from topro.cluster.strategies import deepspeed_safe_globals
    from topro.cluster.trainer import best_checkpoint_path, build_trainer
    from topro.methods import MethodSpec, build_method
    from topro.data import get_task

    cfg = TrainConfig(method="vanilla", model=tiny_udpos, data_dir=str(data_dir), output_dir=str(tmp_path / "run"),
                      workers=2, strategy=strategy, deepspeed_config="zero2", **{**TINY_RUN, "max_steps": 4,
                                                                                  "batch_size": 8})
    result = build_trainer(cfg).fit()
    assert result.error is None
    folder = Path(result.checkpoint.path)
    if strategy == "ddp":
        state = torch.load(folder / "training_state.pt", weights_only=True)["model"]
    else:
        with torch.serialization.safe_globals(deepspeed_safe_globals()):
            module = torch.load(folder / "state" / "mp_rank_00_model_states.pt", weights_only=True)["module"]
        state = {k.removeprefix("model."): v for k, v in module.items()}
    spec = MethodSpec(method="vanilla", task="udpos", labels=list(get_task("udpos").labels), base_model=tiny_udpos,
                      adapter="lora", lora_r=4)
    torch.manual_seed(cfg.seed)
    fresh = build_method(spec, tiny_udpos).build_model(tiny_udpos)
    initial = {n: p.detach() for n, p in fresh.named_parameters()}
    frozen = [n for n, p in fresh.named_parameters() if not p.requires_grad]
    adapters = [n for n in initial if ".lora_B." in n]
    assert frozen and adapters and set(initial) <= set(state)
    assert all(torch.equal(state[n].cpu(), initial[n]) for n in frozen)  # base weights bit-identical
    assert all(state[n].abs().sum() > 0 for n in adapters)  # lora_B starts at zero: it trained
    export = best_checkpoint_path(result)
    export_merged(ExportConfig(merge=str(export), output=str(tmp_path / "merged")))
    assert merged_equals_adapters(Path(export), tmp_path / "merged", data_dir) < 1e-5


# --- bad input, refused before any training ---------------------------------------------------------------------

@pytest.mark.parametrize("overrides,field", [
    (["method=prompt_tuning", "adapter=lora"], "adapter"),
    (["method=topro_soft", "adapter=lora"], "adapter"),  # freeze_backbone: true by default
    (["method=rosprompt", "adapter=lora"], "adapter"),
    (["adapter=lora", "lora_r=0"], "lora_r"),
    (["adapter=lora", "lora_dropout=1.0"], "lora_dropout"),
    (["adapter=lora", "lora_alpha=-1"], "lora_alpha"),
    (["adapter=lora", "lora_targets=[]"], "lora_targets"),
])
def test_bad_lora_settings_are_refused_when_the_config_loads(overrides, field):
    from topro.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=f"field '{field}'"):
        load_config(TrainConfig, None, overrides)
    # soft ToPro that fine-tunes its backbone may take LoRA
    assert load_config(TrainConfig, None, ["method=topro_soft", "freeze_backbone=false", "adapter=lora"]).adapter \
        == "lora"


@pytest.mark.parametrize("kind", ["llama", "tiny"])
def test_lora_targets_matching_no_layer_are_refused_before_a_model_loads(kind, tiny_udpos):
    from topro.config import ConfigError
    from topro.precheck import check_lora_targets

    model = "tiny" if kind == "tiny" else str(tiny_model_dir(kind))
    good = ["q_proj", "o_proj"] if kind == "llama" else ["query", "attention.output.dense"]
    check_lora_targets(TrainConfig(model=model, adapter="lora", lora_targets=good))
    check_lora_targets(TrainConfig(model=model, adapter="lora", lora_targets=["all-linear"]))
    with pytest.raises(ConfigError, match=r"lora_targets: \['qkv'\] match no .* layer names: .*"):
        check_lora_targets(TrainConfig(model=model, adapter="lora", lora_targets=[good[0], "qkv"]))


def test_a_causal_tokenizer_without_pad_token_pads_with_eos_and_says_so(tmp_path, caplog):
    import logging
    import shutil

    from transformers import AutoTokenizer

    from topro.models import load_tokenizer

    source = tiny_model_dir("llama")
    folder = tmp_path / "no-pad"
    shutil.copytree(source, folder)
    tok = AutoTokenizer.from_pretrained(folder)
    tok.pad_token = None
    tok.save_pretrained(folder)
    assert AutoTokenizer.from_pretrained(folder).pad_token is None
    with caplog.at_level(logging.INFO, logger="topro.models"):
        loaded = load_tokenizer(str(folder))
    assert loaded.pad_token == loaded.eos_token == "<eos>"
    assert "no pad token; padding with its end-of-sequence token" in caplog.text
    tok.eos_token = None
    tok.save_pretrained(folder)
    with pytest.raises(ValueError, match="neither a pad nor an end-of-sequence token"):
        load_tokenizer(str(folder))


def test_a_sweep_searches_adapter_and_model(tmp_path, data_dir):
    from topro.config import ConfigError
    from topro.precheck import check_sweep
    from topro.sweep_config import grid_size, load_sweep_config, trial_train_config

    llama = str(tiny_model_dir("llama"))
    path = tmp_path / "s.yaml"
    path.write_text(f"""name: lora-sweep
base: {{task: udpos, model: tiny, epochs: 1, data_dir: {data_dir}, eval_langs: [de]}}
search_space:
  method: {{grid: [vanilla, topro]}}
  adapter: {{grid: [none, lora]}}
  model: {{grid: [tiny, {llama}]}}
""")
    sweep = load_sweep_config(path)
    assert grid_size(sweep) == 8
    trial = trial_train_config(sweep, {"method": "vanilla", "adapter": "lora", "model": llama})
    assert (trial.adapter, trial.model) == ("lora", llama)
    check_sweep(sweep)
    # a setting no trial could run is refused when the sweep loads, naming the field
    path.write_text(path.read_text().replace("[vanilla, topro]", "[vanilla, prompt_tuning]"))
    with pytest.raises(ConfigError, match="field 'adapter'"):
        load_sweep_config(path)
    # LoRA targets must name layers of every searched model (query: BERT's; Llama calls it q_proj)
    path.write_text(path.read_text().replace("[vanilla, prompt_tuning]", "[vanilla]").replace(
        "eval_langs: [de]", "eval_langs: [de], lora_targets: [query]"))
    with pytest.raises(ConfigError, match=r"lora_targets: \['query'\] match no"):
        check_sweep(load_sweep_config(path))
