"""The Ray layer: the only part of topro that imports Ray Train, Tune and Serve helpers.

Everything below it (data, prompts, methods, training loop, evaluation) is
plain Python and runs without Ray.
"""
