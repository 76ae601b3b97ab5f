"""Errors the merge engine reports to users as one line (the CLI exits 2 on them)."""

from __future__ import annotations


class MergeError(Exception):
    """Base class: a problem with the user's input, shown as one line without a traceback."""


class RecipeError(MergeError):
    """A recipe (or evolve config) field is wrong; the message starts with its YAML path.

    ``RecipeError("slices[0].sources[1].layer_range", "end 40 > num_hidden_layers 32 of 'm'")``
    prints as ``slices[0].sources[1].layer_range: end 40 > num_hidden_layers 32 of 'm'``.
    """

    def __init__(self, path: str, message: str) -> None:
        self.path = path
        self.message = message
        super().__init__(f"{path}: {message}" if path else message)


class ModelError(MergeError):
    """An input model is unusable (missing, corrupt, pickle-only, incompatible shapes...).

    The message names the model reference or the file.
    """
