"""``topro serve``: the tagging endpoint (and the LLM one, if configured) on a local or remote Ray.

    topro serve --model runs/udpos-topro/checkpoint --port 8000
    topro serve --model models:/topro-udpos-topro@champion --models panx=models:/topro-panx-topro@champion
    topro serve --model runs/udpos-topro/checkpoint --llm-model http://127.0.0.1:8001/v1   # + POST /llm/tag
    topro serve --config configs/serve/local.yaml port=8001

It deploys the applications of ``serve/config.yaml`` (the file the RayService
manifest embeds; ``serve_config`` names another), so batching, limits,
autoscaling and replica options are the same as with ``serve run
serve/config.yaml``; ``model`` and ``port`` replace the config's. Settings are
``ServeConfig`` fields: ``--config FILE``, ``key=value`` overrides, or the flags
(shorthands for the same fields). With no Ray address it starts a
loopback-only local Ray and binds HTTP to 127.0.0.1. It runs until SIGINT or
SIGTERM, then shuts Serve down.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import os
import re
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from topro.cli.flags import add_config_arguments, add_config_flags, flag_values
from topro.config import ConfigError, check_ranges, load_config, read_yaml
from topro.config import _at_least as at_least

DEFAULT_CONFIG = "serve/config.yaml"


@dataclass
class ServeConfig:
    """What ``topro serve`` deploys, where, and how patiently."""

    serve_config: str = DEFAULT_CONFIG
    """Ray Serve config whose applications are deployed (relative to the working directory: run from the
    repository root, or name it)."""
    model: str | None = None
    """The tagging app's default model: a checkpoint folder or ``models:/<name>@<alias>`` (default: the
    Serve config's)."""
    models: dict[str, str] = field(default_factory=dict)
    """More model ids clients may name in the ``serve_multiplexed_model_id`` header, id -> URI."""
    llm_model: str | None = None
    """The llm app's LLM: HF folder or hub id, or an OpenAI-compatible URL (default: the Serve config's, else
    ``$TOPRO_LLM_MODEL``)."""
    host: str | None = None
    """HTTP host (default: the Serve config's ``http_options.host``, else 127.0.0.1)."""
    port: int | None = None
    """HTTP port (default: the Serve config's ``http_options.port``, else 8000)."""
    apps: list[str] = field(default_factory=list)
    """Applications of the Serve config to run (empty: all)."""
    address: str | None = None
    """Ray cluster address (default ``$RAY_ADDRESS``, else a local Ray)."""
    num_cpus: int | None = None
    """CPUs of the local Ray (default: all)."""
    startup_timeout: float = 600.0
    """Seconds to keep trying to bring Serve up (HTTP proxy and apps); on a busy machine a try can fail and
    the next succeed."""
    startup_attempts: int = 3
    """Tries within ``startup_timeout``."""

    def problems(self) -> list[tuple[str, str]]:
        return check_ranges(self, {"port": at_least(1, optional=True), "num_cpus": at_least(1, optional=True),
                                   "startup_timeout": at_least(0), "startup_attempts": at_least(1)})


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("serve", help="run the HTTP tagging endpoint (Ray Serve)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(p, ServeConfig, "configs/serve/*.yaml; the Ray Serve config itself is --serve-config")
    add_config_flags(p, ServeConfig)
    p.set_defaults(func=cmd_serve)


def config_from_args(args) -> ServeConfig:
    """The flags are shorthands for the fields of the same name (``--models a=URI``: ``models={a: URI}``)."""
    if args.config and "applications" in read_yaml(args.config):
        raise ConfigError(f"--config {args.config}: a Ray Serve config; --config takes topro's ServeConfig "
                          f"(configs/serve/*.yaml), pass a Serve config as --serve-config")
    return load_config(ServeConfig, args.config, args.overrides, **flag_values(args, ServeConfig))


def load_serve_config(path: str | Path) -> dict[str, Any]:
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such Serve config (a relative path is taken from the working "
                                f"directory, {Path.cwd()}: run from the repository root, or give --serve-config)")
    config = yaml.safe_load(path.read_text()) or {}
    if not config.get("applications"):
        raise ValueError(f"{path}: no applications")
    return config


def shipped_app_maker(import_path: str):
    """``make_app`` of the application that ``serve/tagging.py`` or ``serve/llm.py`` re-exports under
    ``import_path`` (what serve/config.yaml names), taken from the installed package, so ``topro serve``
    needs no repository on ``sys.path``; None for any other import path."""
    if import_path == "serve.tagging:build_app":
        from topro.endpoint.tagging import make_app

        return make_app
    if import_path == "serve.llm:build_app":
        from topro.endpoint.llm import make_app

        return make_app
    return None


def build_applications(config: dict[str, Any], *, model: str | None = None, models: dict[str, str] | None = None,
                       llm_model: str | None = None, only: list[str] | None = None,
                       config_dir: str | Path | None = None) -> list[tuple[str, str, Any]]:
    """(name, route_prefix, Application) for each app of a Serve config, deployment options applied.

    A relative ``sqlite:///`` ``tracking_uri`` in the config is taken relative to ``config_dir`` (the
    config file's folder), not to the working directory the server happens to start in."""
    import importlib

    apps = []
    for app in config["applications"]:
        if only and app["name"] not in only:
            continue
        args = dict(app.get("args") or {})
        uri = args.get("tracking_uri")
        if config_dir is not None and isinstance(uri, str) and uri.startswith("sqlite:///") \
                and not uri[len("sqlite:///"):].startswith("/"):
            args["tracking_uri"] = f"sqlite:///{(Path(config_dir) / uri[len('sqlite:///'):]).resolve()}"
        if app["name"] == "tagging":
            if model:
                args["model"] = model
            if models:
                args["models"] = {**args.get("models", {}), **models}
        if app["name"] == "llm" and llm_model:
            args["model"] = llm_model
        options = {d["name"]: {k: v for k, v in d.items() if k != "name"} for d in app.get("deployments", [])}
        make_app = shipped_app_maker(app["import_path"])
        if make_app is None:  # an application of someone else's: its module must be importable here
            module_name, _, attr = app["import_path"].replace(":", ".").rpartition(".")
            module = importlib.import_module(module_name)
            make_app = getattr(module, "make_app", None)
        # topro's apps offer make_app(args, deployment_options), so the config's deployment options apply
        # as they do under `serve run`; a plain builder gets the args only.
        application = make_app(args, options) if make_app else getattr(module, attr)(args)
        apps.append((app["name"], app.get("route_prefix", "/"), application))
    if not apps:
        raise ValueError(f"no application named {only} in the config")
    return apps


# Serve's own checks of its HTTP proxy give up after 3 health checks of 10 s and a 5 s ready check; on a busy
# machine (load 15 on 2 cores) a proxy still starting failed them 3 times in 4. Longer, unless set.
SERVE_PATIENCE_ENV = {"RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S": "30", "RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": "30"}


def start_serve(serve, apps, host: str, port: int, *, budget_s: float, attempts: int) -> str | None:
    """Start Serve's HTTP proxy and deploy ``apps``, retrying a failed try while ``budget_s`` lasts.

    Returns None once every app is RUNNING, else one line: what did not come up, the last error, what to set.
    """
    started = time.monotonic()
    deadline = started + budget_s
    last, what = "", "Serve"
    for attempt in range(1, attempts + 1):
        what = "Serve's HTTP proxy"
        try:
            serve.start(http_options={"host": host, "port": port})
            what = "the applications " + ", ".join(name for name, _, _ in apps)
            # Deployed together; returns once every app is RUNNING, raises if one fails.
            serve.run_many([serve.RunTarget(application, name=name, route_prefix=route_prefix)
                            for name, route_prefix, application in apps])
            return None
        except Exception as err:
            text = re.sub(r"\x1b\[[0-9;]*m", "", str(err)).strip()  # Ray colours its task errors
            last = f"{type(err).__name__}: {text.splitlines()[0][:300] if text else ''}"
            left = deadline - time.monotonic()
            logging.getLogger(__name__).warning("serve start-up try %d of %d failed (%s did not come up: %s)%s",
                                                attempt, attempts, what, last,
                                                "; trying again" if attempt < attempts and left > 0 else "")
            with contextlib.suppress(Exception):
                serve.shutdown()
            if left <= 0:
                break
            time.sleep(min(10.0, left))
    return (f"{what} did not come up at {host}:{port} after {attempt} tries in {time.monotonic() - started:.0f}s "
            f"(last error: {last}); check that the port is free, give it more time with --startup-timeout, or on "
            "a busy machine raise RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S and RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S")


def cmd_serve(args) -> int:
    return serve_apps(config_from_args(args))


def serve_apps(cfg: ServeConfig) -> int:
    """Deploy the Serve config's apps on Ray, print where each answers, and run until SIGINT or SIGTERM."""
    config_path = Path(cfg.serve_config)
    config = load_serve_config(config_path)
    http = dict(config.get("http_options") or {})
    host = cfg.host or http.get("host") or "127.0.0.1"
    port = cfg.port or http.get("port") or 8000

    from topro.cluster.runtime import init_ray
    from topro.endpoint.http import PROXY_CALLBACK, PROXY_CALLBACK_ENV

    # Serve's HTTP proxy answers a header it cannot decode with a plain 500; this middleware answers 400
    # first (it takes effect for a Ray started here; a cluster's head needs the same variable).
    os.environ.setdefault(PROXY_CALLBACK_ENV, PROXY_CALLBACK)
    for key, value in SERVE_PATIENCE_ENV.items():
        os.environ.setdefault(key, value)
    try:
        init_ray(cfg.address, num_cpus=cfg.num_cpus, include_dashboard=False)
    except Exception as err:
        print(f"topro serve: Ray did not come up ({type(err).__name__}: {str(err).strip().splitlines()[0][:300]}); "
              "on a busy machine try again, or give --address of a running Ray", file=sys.stderr)
        return 1
    from ray import serve

    stop = threading.Event()
    failure = None
    received: list[int] = []

    def on_signal(signum, frame):
        received.append(signum)
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)
    try:
        apps = build_applications(config, model=cfg.model, models=cfg.models, llm_model=cfg.llm_model,
                                  only=cfg.apps or None, config_dir=config_path.parent)
        failure = start_serve(serve, apps, host, port, budget_s=cfg.startup_timeout, attempts=cfg.startup_attempts)
        if failure:
            return 1
        for name, route_prefix, _ in apps:
            print(f"topro serve: {name} ready at http://{host}:{port}{route_prefix.rstrip('/')}/", flush=True)
        while not stop.wait(1.0):
            pass
        print(f"topro serve: {signal.Signals(received[0]).name if received else 'stop'} received: shutting down "
              f"(nothing to keep: requests in flight end with the replicas)", flush=True)
    finally:
        serve.shutdown()
        import ray

        ray.shutdown()
        if failure:  # last, after what Ray prints while it stops
            print(f"topro serve: {failure}", file=sys.stderr, flush=True)
    return 128 + received[0] if received else 0
