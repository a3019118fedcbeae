"""The HTTP endpoint: the Ray Serve applications ``tagging`` (over ``topro.serving.Tagger``) and ``llm``.

``args`` holds the applications' settings (typed dataclasses, Ray-free), ``schemas`` the request and
response bodies (pydantic: the HTTP edge only), ``http`` the error handling every app shares, and
``tagging`` / ``llm`` the deployments. ``serve/tagging.py`` and ``serve/llm.py`` at the repository root
are the import paths that ``serve/config.yaml`` and the RayService manifest name; they only re-export
``build_app`` from here.
"""
