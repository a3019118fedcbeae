"""Ray Train on a real local Ray: DDP and DeepSpeed over gloo with two CPU workers, real data, the tiny model.

Runs are kept very small (tens of sentences, short inputs); each ``fit`` costs
about 20 s of Ray start-up on top.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from topro.cli import main
from topro.config import ConfigError, TrainConfig, load_config
from topro.methods import load_checkpoint

# vanilla learns visibly in a few steps with the tiny model, so its dev scores are worth comparing
SMALL_VANILLA = ["max_train_sentences=80", "max_dev_sentences=30", "epochs=2", "max_length=64", "batch_size=8",
                 "learning_rate=3e-3", "eval_langs=[]", "progress=false", "num_threads=1"]
SMALL_TOPRO = ["max_train_sentences=24", "max_dev_sentences=15", "epochs=1", "max_length=48", "batch_size=32",
               "learning_rate=1e-3", "eval_langs=[]", "progress=false"]


def _watch_bound_sockets():
    """Record every socket that this process and its descendants bind, until the returned stop() is called."""
    import socket
    import threading

    import psutil

    seen: dict[tuple[str, int, str], str] = {}
    done = threading.Event()

    def watch():
        me = psutil.Process()
        while not done.is_set():
            for proc in [me, *me.children(recursive=True)]:
                try:
                    for conn in proc.net_connections(kind="inet"):
                        bound = conn.status == psutil.CONN_LISTEN or (conn.type == socket.SOCK_DGRAM and conn.laddr)
                        if bound:
                            seen[(conn.laddr.ip, conn.laddr.port, conn.type.name)] = " ".join(proc.cmdline()[:3])[:120]
                except psutil.Error:
                    pass
            done.wait(0.2)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()

    def stop():
        done.set()
        watcher.join()
        return seen

    return stop


def test_ddp_on_two_workers_matches_one_worker_on_loopback_and_averages(tmp_path, data_dir, tiny_udpos, ray_local):
    """One 2-worker DDP run checked three ways (each Ray Train start costs ~20 s, so they share it):
    - the same config in-process on 1 worker: same steps, similar loss and English dev score;
    - every socket it binds (Ray's servers, the Train workers, the torch rendezvous) is on loopback (before
      LoopbackTorchConfig, rank 0's TCPStore listened on every interface);
    - ``selection: average_top_k``: the export copied to RUN/checkpoint is the averaged model."""
    import ipaddress

    from topro.data import load_split
    from topro.evaluate import evaluate_sentences

    args = ["train", "--config", "configs/train/udpos-vanilla.yaml", "--data-dir", str(data_dir), *SMALL_VANILLA,
            "eval_every_steps=5", "patience=100", "selection=average_top_k", "k=2"]
    assert main([*args, "--output", str(tmp_path / "one")]) == 0
    stop = _watch_bound_sockets()
    try:
        assert main([*args, "--output", str(tmp_path / "two"), "--workers", "2", "--strategy", "ddp"]) == 0
    finally:
        seen = stop()
    one = json.loads((tmp_path / "one" / "metrics.json").read_text())
    two = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert two["world_size"] == 2 and one["world_size"] == 1
    # the global batch does not depend on the number of workers
    assert two["steps_per_epoch"] == one["steps_per_epoch"] and two["steps"] == one["steps"]
    assert [h["step"] for h in two["history"]] == [h["step"] for h in one["history"]]
    for a, b in zip(one["history"], two["history"]):
        assert abs(a["train_loss"] - b["train_loss"]) < 0.05 * a["train_loss"]
    assert one["best_dev_accuracy"] > 0.3  # it learned something, so the comparison means something
    assert abs(two["best_dev_accuracy"] - one["best_dev_accuracy"]) < 0.05

    def loopback(ip: str) -> bool:
        address = ipaddress.ip_address(ip)
        return (getattr(address, "ipv4_mapped", None) or address).is_loopback  # ::ffff:127.0.0.1 too

    outside = {k: v for k, v in seen.items() if not loopback(k[0])}
    print("bound sockets:", *sorted(f"{ip}:{port}/{kind} {who}" for (ip, port, kind), who in seen.items()),
          sep="\n  ")
    assert not outside, outside
    workers = [v for v in seen.values() if "ray::" in v or "default_worker" in v]
    assert len(seen) >= 5 and workers, seen  # Ray's servers and the workers' were seen, so it looked

    # the averaged export was copied to RUN/checkpoint, loads like a single-process one, and scores what
    # the run reported for the average
    assert two["selection"] == "average_top_k" and len(two["averaged_steps"]) == 2
    assert Path(two["ray_checkpoint"]).parent.name.endswith("-averaged")
    assert two["checkpoint"] == str(tmp_path / "two" / "checkpoint")
    method, model = load_checkpoint(two["checkpoint"])
    assert method.name == "vanilla"
    dev = evaluate_sentences(method, model, "udpos", load_split("udpos", "en", "dev", data_dir, limit=30))
    assert dev["accuracy"] == pytest.approx(two["averaged_dev_accuracy"], abs=1e-6)


def test_deepspeed_zero2_survives_a_killed_worker_and_averages(tmp_path, data_dir, tiny_udpos, ray_local):
    """ZeRO-2 on two workers; rank 1 is SIGKILLed at step 7: the group restarts from the step-5 checkpoint.
    With ``selection: average_top_k`` (k=2) the export is the mean of checkpoints made since the restart
    (snapshots live in memory), and it scores what the run reported for it."""
    from topro.cluster.trainer import best_checkpoint_path, build_trainer, fault_injected_at
    from topro.data import load_split
    from topro.evaluate import evaluate_sentences

    cfg = load_config(TrainConfig, "configs/train/udpos-topro.yaml",
                      [*SMALL_TOPRO, f"data_dir={data_dir}", f"output_dir={tmp_path / 'run'}", "workers=2",
                       "strategy=deepspeed", "deepspeed_config=zero2", "eval_every_steps=5", "fault_step=7",
                       "max_failures=1", "patience=100", "selection=average_top_k", "k=2"])
    result = build_trainer(cfg).fit()
    assert result.error is None
    summary = result.return_value
    fault = fault_injected_at(cfg)
    assert fault is not None and fault["step"] == 7 and fault["rank"] == 1
    # resumed from the last checkpoint before the fault, not from step 0
    assert summary["resumed_from_step"] == 5
    assert summary["steps"] == summary["steps_per_epoch"] > 10
    assert [h["step"] for h in summary["history"]][:2] == [5, 10]  # history survived the restart
    metrics = result.metrics  # the last report: the averaged checkpoint's (no training loss of its own)
    assert {"epoch", "step", "dev_accuracy", "best_dev_accuracy", "best_step"} <= set(metrics)
    assert all("train_loss" in h and "dev_accuracy" in h for h in summary["history"])
    # every rank wrote its ZeRO shards into the same Ray checkpoint
    state = Path(result.checkpoint.path) / "state"
    assert {p.name for p in state.iterdir()} >= {"mp_rank_00_model_states.pt",
                                                 "zero_pp_rank_0_mp_rank_00_optim_states.pt",
                                                 "zero_pp_rank_1_mp_rank_00_optim_states.pt"}
    # the averaged export: checkpoints made after the restart only, and it scores what the run reported
    assert summary["selection"] == "average_top_k" and len(summary["averaged_steps"]) == 2
    assert all(step > 5 for step in summary["averaged_steps"]), summary["averaged_steps"]
    export = best_checkpoint_path(result)
    assert Path(export).parent.name.endswith("-averaged")
    method, model = load_checkpoint(export)
    assert method.name == "topro"
    dev = evaluate_sentences(method, model, "udpos", load_split("udpos", "en", "dev", data_dir, limit=15))
    assert dev["accuracy"] == pytest.approx(summary["averaged_dev_accuracy"], abs=1e-6)


def test_deepspeed_config_fills_auto_from_the_run():
    from topro.cluster.strategies import deepspeed_config

    cfg = TrainConfig(strategy="deepspeed", deepspeed_config="zero2", workers=2, batch_size=32, grad_accum=3,
                      max_grad_norm=0.5)
    ds = deepspeed_config(cfg)
    assert ds["zero_optimization"]["stage"] == 2
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], ds["train_batch_size"]) == (16, 3, 96)
    assert ds["gradient_clipping"] == 0.5 and ds["bf16"]["enabled"] is False and "optimizer" not in ds
    assert deepspeed_config(TrainConfig(deepspeed_config="configs/deepspeed/zero3.yaml", dtype="bf16"))["bf16"]["enabled"]
    for stage in range(4):
        assert deepspeed_config(TrainConfig(deepspeed_config=f"zero{stage}"))["zero_optimization"]["stage"] == stage


def test_deepspeed_config_errors_are_clear(tmp_path):
    from topro.cluster.strategies import deepspeed_config

    with pytest.raises(ConfigError, match="no such file"):
        deepspeed_config(TrainConfig(deepspeed_config="configs/deepspeed/zero9.yaml"))
    fp16 = tmp_path / "fp16.json"
    fp16.write_text(json.dumps({"fp16": {"enabled": True}, "zero_optimization": {"stage": 2}}))
    with pytest.raises(ConfigError, match="fp16 is not supported by DeepSpeed on CPU"):
        deepspeed_config(TrainConfig(deepspeed_config=str(fp16)))
    adam = tmp_path / "adam.yaml"
    adam.write_text("optimizer: {type: Adam}\n")
    with pytest.raises(ConfigError, match="remove 'optimizer'"):
        deepspeed_config(TrainConfig(deepspeed_config=str(adam)))
    clash = tmp_path / "clash.yaml"
    clash.write_text("gradient_accumulation_steps: 4\n")
    with pytest.raises(ConfigError, match="gradient_accumulation_steps is 4"):
        deepspeed_config(TrainConfig(deepspeed_config=str(clash), grad_accum=2))


def test_cli_help_shows_the_scale_out_options(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    assert "--workers" in out and "--strategy" in out and "--address" in out


class _RunsCode:
    """What a tampered checkpoint could hold: unpickling it runs code (here: creates a file)."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').close()",)


def test_deepspeed_resume_refuses_a_tampered_pickle(tmp_path, monkeypatch):
    """DeepSpeed loads its state with torch.load(weights_only=False): a pickle planted in the run's storage
    runs code on resume. ``load_deepspeed_state`` loads weights-only (DeepSpeed's own types allow-listed): a
    real ZeRO-2 state resumes, the tampered one is refused and its code never runs. World size 1, gloo."""
    import os
    import pickle

    import deepspeed
    import torch
    import torch.distributed as dist

    from topro.cluster.strategies import DEEPSPEED_TAG, load_deepspeed_state

    # Through monkeypatch: left in os.environ, later in-process tests and every subprocess that copies the
    # environment would think they are rank 0 of a one-process group.
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.setenv(key, "0" if key != "WORLD_SIZE" else "1")
    # A file:// rendezvous: an env:// one would leave a TCPStore listening on every interface in this
    # process (test_a_local_two_worker_run_listens_only_on_loopback watches this process too).
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        def engine():
            torch.manual_seed(0)
            module = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
            optimizer = torch.optim.AdamW(module.parameters(), lr=1e-2)
            scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
            config = {"train_batch_size": 2, "gradient_clipping": 1.0, "zero_optimization": {"stage": 2}}
            return deepspeed.initialize(model=module, optimizer=optimizer, lr_scheduler=scheduler, config=config,
                                        dist_init_required=False)[0]

        trained = engine()
        for _ in range(3):
            trained.backward(trained(torch.randn(2, 4)).sum())
            trained.step()
        trained.save_checkpoint(str(tmp_path), tag=DEEPSPEED_TAG)
        resumed = engine()
        load_deepspeed_state(resumed, tmp_path)
        assert resumed.global_steps == 3
        for a, b in zip(trained.module.parameters(), resumed.module.parameters()):
            assert torch.equal(a, b)

        marker = tmp_path / "code-ran"
        states = tmp_path / DEEPSPEED_TAG / "mp_rank_00_model_states.pt"
        tampered = torch.load(states, weights_only=False)
        tampered["planted"] = _RunsCode(str(marker))
        torch.save(tampered, states)
        engine().load_checkpoint(str(tmp_path), tag=DEEPSPEED_TAG)  # DeepSpeed's own load runs it
        assert marker.exists()
        marker.unlink()
        with pytest.raises(pickle.UnpicklingError, match=r"mp_rank_00_model_states.pt: refusing to resume: it holds a pickled 'exec'"):
            load_deepspeed_state(engine(), tmp_path)
        assert not marker.exists()
    finally:
        dist.destroy_process_group()


def test_checkpoint_averaging_refuses_zero3_before_workers_start(tmp_path):
    from topro.cluster.trainer import build_trainer

    cfg = TrainConfig(strategy="deepspeed", deepspeed_config="zero3", workers=2, selection="average_last_k", k=2,
                      output_dir=str(tmp_path / "run"))
    with pytest.raises(ConfigError, match="not supported with DeepSpeed ZeRO-3"):
        build_trainer(cfg)
