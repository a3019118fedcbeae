"""``topro serve``: the tagging endpoint (and the LLM one, if configured) on a local or remote Ray.

    topro serve --model runs/udpos-topro/checkpoint --port 8000
    topro serve --model models:/topro-udpos-topro@champion --models panx=models:/topro-panx-topro@champion
    topro serve --model runs/udpos-topro/checkpoint --llm-model http://127.0.0.1:8001/v1   # + POST /llm/tag

It deploys the applications of ``serve/config.yaml`` (the file the RayService
manifest embeds), so batching, limits, autoscaling and replica options are the
same as with ``serve run serve/config.yaml``; ``--model`` and ``--port`` replace
the config's. With no Ray address it starts a loopback-only local Ray and binds
HTTP to 127.0.0.1. It runs until SIGINT or SIGTERM, then shuts Serve down.
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
from pathlib import Path
from typing import Any

DEFAULT_CONFIG = "serve/config.yaml"


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("serve", help="run the HTTP tagging endpoint (Ray Serve)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="checkpoint folder or models:/<name>@<alias> (default: the config's)")
    p.add_argument("--models", nargs="*", default=[], metavar="ID=URI",
                   help="more model ids clients may name in the serve_multiplexed_model_id header")
    p.add_argument("--llm-model", help="the llm app's LLM: HF folder or hub id, or an OpenAI-compatible URL "
                                       "(default: the config's, else $TOPRO_LLM_MODEL)")
    p.add_argument("--port", type=int, help="HTTP port (default: the config's http_options.port, 8000)")
    p.add_argument("--host", default=None, help="HTTP host (default: the config's, 127.0.0.1)")
    p.add_argument("--config", default=None, help=f"Serve config (default: {DEFAULT_CONFIG} of the project)")
    p.add_argument("--apps", default=None, help="comma-separated applications of the config to run "
                                               "(default: all)")
    p.add_argument("--address", help="Ray cluster address (default $RAY_ADDRESS, else a local Ray)")
    p.add_argument("--num-cpus", type=int, help="CPUs of the local Ray (default: all)")
    p.add_argument("--startup-timeout", type=float, default=600.0, metavar="S",
                   help="seconds to keep trying to bring Serve up (HTTP proxy and apps), %(default)s; on a busy "
                        "machine a try can fail and the next succeed")
    p.add_argument("--startup-attempts", type=int, default=3, help="tries within that time (%(default)s)")
    p.set_defaults(func=cmd_serve)


def project_root() -> Path:
    """The folder holding the ``serve`` package; put on ``sys.path`` and on ``PYTHONPATH`` for Ray workers."""
    candidates = [Path.cwd(), Path(__file__).resolve().parents[2]]
    try:
        import serve.tagging  # noqa: F401  (already importable, e.g. PYTHONPATH set in the image)

        candidates.insert(0, Path(serve.tagging.__file__).resolve().parents[1])
    except ImportError:
        pass
    for root in candidates:
        if (root / "serve" / "tagging.py").is_file():
            if str(root) not in sys.path:
                sys.path.insert(0, str(root))
            paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
            if str(root) not in paths:
                os.environ["PYTHONPATH"] = os.pathsep.join([str(root), *paths])
            return root
    raise FileNotFoundError("cannot find the serve/ applications (serve/tagging.py): run from the project "
                            "root or set PYTHONPATH to it")


def load_serve_config(path: str | Path) -> dict[str, Any]:
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such Serve config")
    config = yaml.safe_load(path.read_text()) or {}
    if not config.get("applications"):
        raise ValueError(f"{path}: no applications")
    return config


def _parse_models(pairs: list[str]) -> dict[str, str]:
    models = {}
    for pair in pairs:
        model_id, sep, uri = pair.partition("=")
        if not sep or not model_id or not uri:
            raise ValueError(f"--models {pair!r}: expected ID=URI")
        models[model_id] = uri
    return models


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
        module_name, _, attr = app["import_path"].replace(":", ".").rpartition(".")
        module = importlib.import_module(module_name)
        # serve/ apps offer make_app(args, deployment_options), so the config's deployment options apply
        # as they do under `serve run`; a plain builder gets the args only.
        make_app = getattr(module, "make_app", None)
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
    root = project_root()
    config_path = Path(args.config) if args.config else root / DEFAULT_CONFIG
    config = load_serve_config(config_path)
    http = dict(config.get("http_options") or {})
    host = args.host or http.get("host") or "127.0.0.1"
    port = args.port or http.get("port") or 8000
    only = [a for a in args.apps.split(",") if a] if args.apps else None
    models = _parse_models(args.models)

    from topro.cluster.runtime import init_ray

    # Serve's HTTP proxy answers a header it cannot decode with a plain 500; this middleware answers 400
    # first (it takes effect for a Ray started here; a cluster's head needs the same variable).
    os.environ.setdefault("RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH", "serve.http:proxy_middlewares")
    for key, value in SERVE_PATIENCE_ENV.items():
        os.environ.setdefault(key, value)
    try:
        init_ray(args.address, num_cpus=args.num_cpus, include_dashboard=False)
    except Exception as err:
        print(f"topro serve: Ray did not come up ({type(err).__name__}: {str(err).strip().splitlines()[0][:300]}); "
              "on a busy machine try again, or give --address of a running Ray", file=sys.stderr)
        return 1
    from ray import serve

    stop = threading.Event()
    failure = None
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        apps = build_applications(config, model=args.model, models=models, llm_model=args.llm_model, only=only,
                                  config_dir=config_path.parent)
        failure = start_serve(serve, apps, host, port, budget_s=args.startup_timeout, attempts=args.startup_attempts)
        if failure:
            return 1
        for name, route_prefix, _ in apps:
            print(f"topro serve: {name} ready at http://{host}:{port}{route_prefix.rstrip('/')}/", flush=True)
        while not stop.wait(1.0):
            pass
        print("topro serve: shutting down", flush=True)
    finally:
        serve.shutdown()
        import ray

        ray.shutdown()
        if failure:  # last, after what Ray prints while it stops
            print(f"topro serve: {failure}", file=sys.stderr, flush=True)
    return 0
