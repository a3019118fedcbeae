"""``import_path: serve.tagging:build_app``: the tagging application, ``topro.endpoint.tagging``."""
from topro.endpoint.tagging import build_app

__all__ = ["build_app"]
