"""Observers that follow a run (:class:`~evolve.protocols.SearchObserver`): the terminal
progress bar (:mod:`.progress`) and Weights & Biases (:mod:`.wandb_logger`, imports wandb)."""

from evolve.observers.progress import ProgressObserver

__all__ = ["ProgressObserver"]
