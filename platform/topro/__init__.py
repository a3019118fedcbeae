"""topro: prompt-based cross-lingual sequence labeling."""
__version__ = "0.1.0"
