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


class MethodError(ValueError):
    """A merge method was configured wrongly (bad parameter value, wrong number of models...).

    The message is one line and says what is wrong; callers prefix it with the YAML path.
    A ValueError (not a MergeError): callers that predate this module catch it as one, and the
    recipe and planner layers turn it into a RecipeError that names the YAML path.
    """


def first_line(text: str) -> str:
    """The first non-empty line of ``text``, stripped ("" when there is none)."""
    for line in text.splitlines():
        if line.strip():
            return line.strip()
    return ""


def one_line(exc: BaseException) -> str:
    """``"<ExceptionType>: <first non-empty line of its message>"``; the type alone when the
    message is empty.  For reporting an unexpected exception inside a one-line message."""
    line = first_line(str(exc))
    return f"{type(exc).__name__}: {line}" if line else type(exc).__name__
