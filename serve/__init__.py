"""The import paths that ``serve/config.yaml`` and the RayService manifest name (``serve.tagging:build_app``,
``serve.llm:build_app``); the applications themselves live in the installed package, ``topro.endpoint``."""
