"""Ray Serve applications: ``serve.tagging`` (the tagging endpoint) and ``serve.llm`` (LLM ToPro tagging).

Imported as the top-level package ``serve`` from the repository root (``serve run
serve/config.yaml``); the models and their logic live in the ``topro`` package.
"""
