"""Shared fixtures: real XTREME data from ../shared, tiny random models of real architectures."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

pytest_plugins = ["pytester"]  # tests/test_isolation.py runs the suite's own guards on planted tests

REPO = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("TOPRO_SHARED_DIR", REPO.parent / "shared"))
DATA_DIR = SHARED / "data" / "xtreme"

# Set before anything imports topro, so subprocesses and Ray workers inherit them.
os.environ.setdefault("TOPRO_DATA_DIR", str(DATA_DIR))
os.environ.setdefault("TOPRO_CACHE", str(REPO / ".cache" / "topro-test"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
# Serve replicas log to Ray's files (<ray temp>/session_latest/logs/serve/), not into pytest's output,
# where their lines interleave with the test report.
os.environ.setdefault("RAY_SERVE_LOG_TO_STDERR", "0")
# Ray workers (Serve's HTTP proxy among them) import this checkout's `topro` (and `serve`); the proxy loads the
# model-id header check from it, as `topro serve` arranges.
_paths = [str(REPO), str(REPO / "platform")]
os.environ["PYTHONPATH"] = os.pathsep.join(
    _paths + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p not in _paths])
os.environ.setdefault("RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH", "topro.endpoint.http:proxy_middlewares")


# --- test tiers --------------------------------------------------------------------------------------
# The fast tier (`bash scripts/test.sh`, the README's test command) is `-m "smoke or not slow"`: every test
# that needs no Ray cluster, no Serve, no sweep and no MLflow server, plus the `smoke` tests (one real run of
# each component). The full tier (`bash scripts/test.sh full`, CI) runs everything. A test that uses one of
# these fixtures is put in the full tier here, so nobody has to remember the mark; an explicit `smoke` mark
# keeps a test in the fast tier whatever fixtures it uses.
FULL_TIER_FIXTURES = frozenset({
    "ray_local",        # a local Ray cluster
    "ray_for_serve", "serve_url", "endpoint",  # Ray Serve with four apps
    "sweep_run",        # a whole sweep (Tune over Train, MLflow, evaluation actors)
    "mlflow_server",    # an `mlflow server` subprocess
})


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.get_closest_marker("smoke") is None and FULL_TIER_FIXTURES & set(item.fixturenames):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(autouse=True)
def _own_tracking_uri(request, monkeypatch, tmp_path_factory):
    """Each test starts with MLflow pointed at nothing it did not choose: commands run in-process set MLflow's
    process-wide tracking URI (and ``$MLFLOW_TRACKING_URI``) to their own stores, and a later test that read
    the global one saw an earlier test's store. Tests that use ``model_registry`` get that registry."""
    import mlflow

    if "model_registry" in request.fixturenames:
        uri = request.getfixturevalue("model_registry")["uri"]
    else:
        uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow-default') / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    yield
    mlflow.set_tracking_uri(None)


# What a test must not leave behind in the process environment: later in-process tests and every subprocess
# that copies the environment (Ray workers, servers, `topro` children) would inherit it. Set them through
# monkeypatch; a test that leaks one fails here.
GUARDED_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture(autouse=True)
def _no_leaked_distributed_env():
    before = {key: os.environ.get(key) for key in GUARDED_ENV}
    yield
    after = {key: os.environ.get(key) for key in GUARDED_ENV}
    leaked = {key: value for key, value in after.items() if value != before[key]}
    assert not leaked, f"the test left {leaked} in os.environ; set them with monkeypatch.setenv"


@pytest.fixture(scope="session")
def data_dir() -> Path:
    assert DATA_DIR.is_dir(), f"real XTREME data expected at {DATA_DIR} (set TOPRO_SHARED_DIR)"
    return DATA_DIR


@pytest.fixture(scope="session")
def tiny_udpos(data_dir) -> str:
    from topro.models import build_tiny_model

    return str(build_tiny_model("udpos", str(data_dir)))


@pytest.fixture(scope="session")
def tiny_panx(data_dir) -> str:
    from topro.models import build_tiny_model

    return str(build_tiny_model("panx", str(data_dir)))


def label_words() -> list[str]:
    from topro.prompts import get_verbalizer, list_verbalizers

    return sorted({w for t in ("udpos", "panx") for v in list_verbalizers(t) if v.startswith("topro")
                   for w in get_verbalizer(t, v).words.values()})


def keep_label_words_whole(tok) -> None:
    """Make the ToPro label words whole tokens (" noun" -> ["noun"]), as the paper's single-token
    verbalizers assume. Said outright rather than left to how transformers converts sentencepiece's
    user-defined symbols: 5.23 made them such added tokens, 5.25 splits some (" auxiliar" ->
    ["▁", "au", "x", ...])."""
    from transformers import AddedToken

    tok.add_tokens([AddedToken(w, lstrip=True, normalized=False) for w in label_words()])


@pytest.fixture(scope="session")
def spm_model(tmp_path_factory, data_dir) -> Path:
    """A small sentencepiece model trained on real data, label words kept whole."""
    import sentencepiece as spm

    from topro.data import load_split

    folder = tmp_path_factory.mktemp("spm")
    corpus = folder / "corpus.txt"
    lines = [" ".join(s.words) for lang in ("en", "de", "ru") for s in load_split("udpos", lang, "train" if lang == "en" else "dev", limit=300)]
    corpus.write_text("\n".join(lines))
    words = label_words()
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(folder / "sp"), vocab_size=2000,
                                   user_defined_symbols=words, character_coverage=1.0, bos_id=-1, eos_id=-1,
                                   unk_id=0, pad_id=-1, minloglevel=2)
    return folder / "sp.model"


@pytest.fixture(scope="session")
def tiny_xlmr(tmp_path_factory, spm_model) -> str:
    """A tiny random XLM-R masked LM with a real sentencepiece tokenizer."""
    import torch
    from transformers import XLMRobertaConfig, XLMRobertaForMaskedLM, XLMRobertaTokenizer

    folder = tmp_path_factory.mktemp("tiny-xlmr")
    shutil.copy(spm_model, folder / "sentencepiece.bpe.model")  # converted to a fast tokenizer on load
    tok = XLMRobertaTokenizer.from_pretrained(folder)
    keep_label_words_whole(tok)
    tok.save_pretrained(folder)
    torch.manual_seed(0)
    cfg = XLMRobertaConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                           intermediate_size=64, max_position_embeddings=520, type_vocab_size=1,
                           pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    XLMRobertaForMaskedLM(cfg).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="session")
def tiny_mt5(tmp_path_factory, spm_model) -> str:
    """A tiny random mT5 with a real sentencepiece tokenizer (with T5 sentinels)."""
    import torch
    from transformers import MT5Config, MT5ForConditionalGeneration, T5Tokenizer

    folder = tmp_path_factory.mktemp("tiny-mt5")
    shutil.copy(spm_model, folder / "spiece.model")
    tok = T5Tokenizer.from_pretrained(folder, extra_ids=10)
    keep_label_words_whole(tok)
    tok.save_pretrained(folder)
    torch.manual_seed(0)
    cfg = MT5Config(vocab_size=len(tok), d_model=32, d_kv=16, d_ff=64, num_layers=2, num_decoder_layers=2,
                    num_heads=2, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                    decoder_start_token_id=tok.pad_token_id)
    MT5ForConditionalGeneration(cfg).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="session")
def ray_local():
    """One loopback-only local Ray for the whole session (shared by the train and sweep tests)."""
    from topro.cluster.runtime import init_ray

    ray = init_ray()
    # Loopback only: a node on the machine's external address would send traffic off the box.
    assert {n["NodeManagerAddress"] for n in ray.nodes()} == {"127.0.0.1"}, ray.nodes()
    yield ray
    ray.shutdown()


# --- trained checkpoints and a model registry (serving tests) --------------------------------------

@pytest.fixture(scope="session")
def tiny_topro_checkpoint(tmp_path_factory, tiny_udpos) -> Path:
    """A tiny udpos ToPro checkpoint, really trained (30 sentences, 1 epoch)."""
    from topro.config import TrainConfig, load_config
    from topro.train import train

    out = tmp_path_factory.mktemp("tiny-topro-run")
    summary = train(load_config(TrainConfig, str(REPO / "configs/train/udpos-topro.yaml"),
                                ["max_train_sentences=30", "max_dev_sentences=10", "epochs=1", "eval_langs=[]",
                                 "progress=false", f"output_dir={out}"]))
    return Path(summary["checkpoint"])


@pytest.fixture(scope="session")
def untrained_checkpoint(tmp_path_factory):
    """Factory: a checkpoint of ``method`` on ``task`` with the tiny model's initial weights (no training)."""
    from topro.data import get_task
    from topro.methods import MethodSpec, build_method
    from topro.models import build_tiny_model

    made: dict[tuple, Path] = {}

    def make(task: str, method: str, **spec) -> Path:
        key = (task, method, repr(sorted(spec.items())))
        if key not in made:
            model_path = str(build_tiny_model(task, str(DATA_DIR)))
            m = build_method(MethodSpec(method=method, task=task, labels=list(get_task(task).labels),
                                        base_model="tiny", **spec), model_path)
            folder = tmp_path_factory.mktemp(f"untrained-{task}-{method}")
            m.save(m.build_model(model_path), folder)
            made[key] = folder
        return made[key]

    return make


@pytest.fixture(scope="session")
def model_registry(tmp_path_factory, tiny_topro_checkpoint):
    """A real MLflow registry in a temporary SQLite store holding ``topro-udpos-topro@champion`` (the
    trained tiny checkpoint, logged as a run's ``checkpoint`` artifact). Yields the tracking URI, which is
    also ``$MLFLOW_TRACKING_URI`` while the session lasts."""
    import mlflow

    from topro.tracking import register_checkpoint

    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    previous = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = uri
    mlflow.set_tracking_uri(uri)
    experiment = mlflow.create_experiment("serving-tests", artifact_location=str(root / "artifacts"))
    with mlflow.start_run(experiment_id=experiment, run_name="tiny-udpos-topro") as run:
        mlflow.log_artifacts(str(tiny_topro_checkpoint), "checkpoint")
    version = register_checkpoint(run.info.run_id, "topro-udpos-topro", "champion")
    yield {"uri": uri, "run_id": run.info.run_id, "version": version,
           "model": "models:/topro-udpos-topro@champion"}
    if previous is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = previous
        mlflow.set_tracking_uri(previous)
