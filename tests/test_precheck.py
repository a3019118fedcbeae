"""Mistakes are caught before work starts: one-line errors in seconds, nothing left behind (no Ray, no model)."""
import json
import time
from pathlib import Path

import pytest

from topro.cli import main
from topro.config import ConfigError, TrainConfig, load_config
from topro.sweep_config import load_sweep_config

REPO = Path(__file__).resolve().parent.parent
TRAIN = "configs/train/panx-vanilla.yaml"


def run_cli(argv, capsys):
    started = time.perf_counter()
    code = main(argv)
    seconds = time.perf_counter() - started
    err = capsys.readouterr().err.strip()
    return code, err, seconds


def assert_refused(code, err, seconds, *needles):
    assert code == 2, err
    last = err.splitlines()[-1]
    assert "Traceback" not in err
    for needle in needles:
        assert needle in last, last
    assert seconds < 120  # a guard against building a model or starting Ray, not a speed test (busy machines)


@pytest.fixture
def workdir(tmp_path, monkeypatch, request):
    """Commands run in an empty folder: afterwards it must still be empty (no run folder, no mlflow.db)."""
    monkeypatch.chdir(tmp_path)
    yield tmp_path
    assert sorted(p.name for p in tmp_path.iterdir()) == [], "a refused command left files behind"


@pytest.mark.parametrize("overrides,needles", [
    (["--data-dir", "/no/such/data"], ["data folder '/no/such/data' (--data-dir) does not exist"]),
    (["eval_langs=de,xx"], ["eval_langs: ['xx'] is not a language of task 'panx'", "de,el"]),
    (["eval_langs=de,ja"], ["eval_langs: no dev split for ja of task 'panx'"]),
    (["train_lang=ja"], ["train_lang: no dev split for ja"]),
    (["model=/nonexistent/path"], ["model '/nonexistent/path': no such folder"]),
    (["model=no-such-org/no-such-model"], ["model 'no-such-org/no-such-model'", "not in the Hugging Face cache",
                                           "the hub is not reachable"]),
    (["template=nope"], ["unknown template 'nope' for task 'panx'", "topro_is"]),
    (["verbalizer=nope"], ["unknown verbalizer 'nope' for task 'panx'"]),
    (["method=vanila"], ["unknown method 'vanila'", "vanilla"]),
    (["epochs=0"], ["command line: field 'epochs': must be at least 1, got 0"]),
    (["epochs=-1"], ["field 'epochs': must be at least 1, got -1"]),
    (["grad_accum=0"], ["field 'grad_accum': must be at least 1, got 0"]),
    (["batch_size=0"], ["field 'batch_size': must be at least 1, got 0"]),
    (["learning_rate=0"], ["field 'learning_rate': must be a positive finite number, got 0.0"]),
    (["learning_rate=nan"], ["field 'learning_rate': must be a positive finite number, got nan"]),
    (["max_train_sentence=10"], ["command line: unknown key 'max_train_sentence' "
                                 "(did you mean 'max_train_sentences'?)"]),
])
def test_train_refuses_before_work_starts(workdir, capsys, monkeypatch, overrides, needles):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    argv = ["train", "--config", str(REPO / TRAIN), "--output", str(workdir / "run")]
    code, err, seconds = run_cli(argv + overrides, capsys)
    assert_refused(code, err, seconds, *needles)


def test_no_data_folder_at_all_says_so(workdir, capsys, monkeypatch, tmp_path):
    import topro.data.loading

    monkeypatch.delenv("TOPRO_DATA_DIR")
    monkeypatch.setattr(topro.data.loading, "SHARED_DATA_DIR", tmp_path / "no-shared")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, err, seconds = run_cli(["train", "--config", str(REPO / TRAIN), "--output", "run"], capsys)
    assert_refused(code, err, seconds, "no data folder given", "pass --data-dir or set TOPRO_DATA_DIR")


def test_data_folder_beside_the_checkout_is_found_without_settings(monkeypatch):
    """A fresh clone beside ../shared finds the data as every README command expects: no TOPRO_DATA_DIR."""
    from topro.data.loading import CHECKOUT, SHARED_DATA_DIR, resolve_data_dir

    monkeypatch.delenv("TOPRO_DATA_DIR")
    if not SHARED_DATA_DIR.is_dir():
        pytest.skip(f"no {SHARED_DATA_DIR} beside this checkout")
    assert resolve_data_dir(None) == CHECKOUT.parent / "shared" / "data" / "xtreme"
    monkeypatch.setenv("TOPRO_DATA_DIR", "/elsewhere")
    assert resolve_data_dir(None) == Path("/elsewhere")
    assert resolve_data_dir("/given") == Path("/given")


def test_data_folder_without_the_task(workdir, capsys, tmp_path_factory):
    empty = tmp_path_factory.mktemp("empty-data")
    code, err, seconds = run_cli(["train", "--config", str(REPO / TRAIN), "--data-dir", str(empty),
                                  "--output", "run"], capsys)
    assert_refused(code, err, seconds, "has no panx/ folder")


def _fake_checkpoint(folder, task):
    """Only what the pre-check reads: a checkpoint's topro.json (the model is never loaded)."""
    folder.mkdir(parents=True)
    (folder / "topro.json").write_text(json.dumps({"task": task, "method": "vanilla"}))
    return folder


def test_evaluate_refuses_a_missing_language_before_evaluating_any(tmp_path, capsys, monkeypatch):
    checkpoint = _fake_checkpoint(tmp_path / "ckpt", "udpos")
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "eval.json"
    code, err, seconds = run_cli(["evaluate", "--checkpoint", str(checkpoint), "--langs", "de,xx",
                                  "--output", str(out)], capsys)
    assert_refused(code, err, seconds, "--langs: ['xx'] is not a language of task 'udpos'")
    assert not out.exists()
    code, err, seconds = run_cli(["evaluate", "--checkpoint", str(tmp_path / "nope"), "--langs", "de",
                                  "--output", str(out)], capsys)
    assert_refused(code, err, seconds, "no such folder")
    code, err, seconds = run_cli(["evaluate", "--checkpoint", str(checkpoint), "--langs", "de",
                                  "--data-dir", str(tmp_path / "nodata"), "--output", str(out)], capsys)
    assert_refused(code, err, seconds, "does not exist")
    assert not out.exists()


@pytest.mark.parametrize("args,needles", [
    (["--model", "/no/such/llm"], ["--model '/no/such/llm': no such folder"]),
    (["--model", "tiny", "--format", "nope"], ["--format: unknown prompt format 'nope'"]),
    (["--model", "tiny", "--langs", "de,xx"], ["['xx'] is not a language of task 'udpos'"]),
    (["--model", "tiny", "--data-dir", "/no/such/data"], ["data folder '/no/such/data' (--data-dir) does not exist"]),
    (["--model", "tiny", "--verbalizer", "nope"], ["unknown verbalizer 'nope'"]),
])
def test_eval_llm_refuses_before_work_starts(workdir, capsys, monkeypatch, args, needles):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    argv = ["eval-llm", "--task", "udpos", "--langs", "de", "--no-ray", "--no-mlflow", *args]
    code, err, seconds = run_cli(argv, capsys)
    assert_refused(code, err, seconds, *needles)


@pytest.mark.parametrize("overrides,needles", [
    (["--data-dir", "/no/such/data"], ["data folder '/no/such/data' (--data-dir) does not exist"]),
    (["eval_langs=de,xx"], ["eval_langs: ['xx'] is not a language of task 'udpos'"]),
    (["model=/no/such/model"], ["model folder '/no/such/model' does not exist"]),
    (["max_train_sentence=10"], ["command line: unknown key 'max_train_sentence' "
                                 "(did you mean 'max_train_sentences'?)"]),
    (["epochs=0"], ["command line: base: field 'epochs': must be at least 1, got 0"]),
    (["grad_accum=0"], ["field 'grad_accum': must be at least 1"]),
    (["search_space.template.grid=[nope]"], ["unknown template 'nope' for task 'udpos'"]),
])
def test_sweep_refuses_on_the_driver_before_ray_or_mlflow(workdir, capsys, overrides, needles):
    """Nothing is started: no Ray (the test runs without one), no mlflow.db, no outputs/sweeps folder."""
    code, err, seconds = run_cli(["sweep", "--config", str(REPO / "configs/sweeps/demo.yaml"), *overrides],
                                 capsys)
    assert_refused(code, err, seconds, *needles)


def test_values_are_checked_where_they_were_typed(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("task: udpos\nepochs: 0\n")
    with pytest.raises(ConfigError, match=r"c.yaml: field 'epochs': must be at least 1, got 0"):
        load_config(TrainConfig, path)
    with pytest.raises(ConfigError, match=r"^command line: field 'warmup_ratio': must be in \[0, 1\)"):
        load_config(TrainConfig, None, ["warmup_ratio=1.5"])
    assert load_config(TrainConfig, None, ["max_steps=null", "epochs=1"]).max_steps is None


def test_sweep_override_typos_suggest_any_field_a_sweep_accepts(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("name: t\nbase: {task: udpos, model: tiny}\nsearch_space:\n  seed: {grid: [1, 2]}\n")
    with pytest.raises(ConfigError, match=r"^command line: unknown key 'max_train_sentence' "
                                          r"\(did you mean 'max_train_sentences'\?\)"):
        load_sweep_config(path, ["max_train_sentence=10"])
    with pytest.raises(ConfigError, match=r"^command line: unknown key 'base.lerning_rate' "
                                          r"\(did you mean 'base.learning_rate'\?\)"):
        load_sweep_config(path, ["base.lerning_rate=1e-3"])
    with pytest.raises(ConfigError, match=r"did you mean 'num_samples'"):
        load_sweep_config(path, ["num_sample=2"])


def test_failure_advice_matches_the_failure():
    from topro.cluster.sweep import failure_advice

    assert "fix the configuration or data" in failure_advice([ValueError("x")])
    transient = failure_advice([RuntimeError("worker died")])
    assert "rerun the same command" in transient and "fix" not in transient


def test_a_method_without_a_class_for_the_backbone_kind_is_refused_before_loading(workdir, capsys, monkeypatch):
    """The registry says which backbone kinds a method runs on: a method with no decoder-only class, given a
    causal LM, stops in the pre-checks with a message naming the method, the model kind and the methods that
    run on it. The model folder holds a config and no weights, so any model load would fail otherwise."""
    from transformers import LlamaConfig

    from topro.method_registry import METHOD_REGISTRY, MethodEntry

    monkeypatch.setitem(METHOD_REGISTRY, "masked_only", MethodEntry(
        "masked_only", "topro.methods.topro_mlm:ToProMLM", prompted=True, head="pretrained_mlm"))
    llama = workdir.parent / "llama-config-only"
    LlamaConfig(max_position_embeddings=256, architectures=["LlamaForCausalLM"]).save_pretrained(llama)
    ray_was_up = _ray_is_up()  # an earlier test of the full tier may have started one
    code, err, seconds = run_cli(["train", "--config", str(REPO / "configs/train/udpos-topro.yaml"), "--output", "run",
                                  f"model={llama}", "method=masked_only", "max_length=128"], capsys)
    assert_refused(code, err, seconds, "method 'masked_only' has no implementation for causal LMs (llama",
                   "the methods that run on causal LMs: vanilla, topro, prompt_tuning, topro_soft, rosprompt")
    assert _ray_is_up() == ray_was_up  # the pre-check started no Ray


def _ray_is_up() -> bool:
    import sys

    return "ray" in sys.modules and sys.modules["ray"].is_initialized()


def test_packed_prompts_on_an_alibi_model_are_refused_before_loading(workdir, capsys):
    """BLOOM (ALiBi) runs ToPro per word only: packing is refused from its config, naming the field."""
    from transformers import BloomConfig

    bloom = workdir.parent / "bloom-config-only"
    BloomConfig(architectures=["BloomForCausalLM"]).save_pretrained(bloom)
    code, err, seconds = run_cli(["train", "--config", str(REPO / "configs/train/udpos-topro.yaml"), "--output", "run",
                                  f"model={bloom}", "prompt_packing=sentence"], capsys)
    assert_refused(code, err, seconds, "prompt_packing='sentence'", "(bloom)", "ALiBi", "per_word")
