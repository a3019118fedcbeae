"""``import_path: serve.llm:build_app``: the LLM tagging application, ``topro.endpoint.llm``."""
from topro.endpoint.llm import build_app

__all__ = ["build_app"]
