"""merge_core: a mergekit-compatible merge engine (recipes, methods, tensor I/O)."""

__version__ = "0.1.0"
