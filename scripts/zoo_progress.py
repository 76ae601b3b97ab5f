"""Steady progress lines while the toy zoo builds: step, loss and ETA of the model in training.

The build itself (``scripts/toy_zoo``) reports one line per finished model; a model takes
minutes on a busy machine.  :class:`BuildProgress` watches the training from outside through
torch's global hooks (an optimizer-step hook counts the steps, a forward hook reads the loss the
model returns) and prints a line every ``every`` seconds.  It only reads: the zoo's bytes do
not change, and neither does its cache key, which hashes the ``toy_zoo`` code (this module is
outside it on purpose: progress output is not what the zoo is made of).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

__all__ = ["BuildProgress", "format_seconds"]


def format_seconds(seconds: float) -> str:
    """``42 s``, ``3 min 05 s``: a duration for a progress line."""
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds} s"
    return f"{seconds // 60} min {seconds % 60:02d} s"


class BuildProgress:
    """Progress of a zoo build whose training phases are ``phases`` ((name, steps), in order).

    Use as a context manager around ``build_zoo``; pass :meth:`log` as its ``log`` callback so
    that the build's own lines are printed too.  After the last training step the lines count
    the evaluation's scored batches (their number is not known in advance: no ETA there).
    """

    def __init__(self, phases: list[tuple[str, int]], every: float = 5.0, out: TextIO | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.phases = phases
        self.total = sum(steps for _, steps in phases)
        self.every = every
        self.out = out
        self.clock = clock
        self.steps = 0  # optimizer steps over the whole build
        self.loss: float | None = None
        self.batches = 0  # evaluation forward passes
        self.started = self.phase_started = self.eval_started = self.last_line = clock()
        self._want_loss = True
        self._handles: list[Any] = []

    # -- where the build is ------------------------------------------------------------

    def phase(self) -> tuple[int, str, int, int]:
        """(index, name, steps done in it, its steps) of the phase of the latest step (the
        first phase before any step)."""
        done = self.steps
        for i, (name, steps) in enumerate(self.phases):
            if done <= steps:
                return i, name, done, steps
            done -= steps
        name, steps = self.phases[-1]
        return len(self.phases) - 1, name, steps, steps

    @property
    def training_done(self) -> bool:
        """Whether every training step was taken (the evaluation follows)."""
        return self.steps >= self.total

    def line(self) -> str:
        """The progress line for now."""
        now = self.clock()
        if self.training_done and self.batches:
            return f"  evaluation: {self.batches} batches scored, {format_seconds(now - self.eval_started)}"
        index, name, done, steps = self.phase()
        # The clock of a model starts at its first step's end (the base's also waits for the
        # tokenizer): the rate is measured over the steps since.
        rate = (now - self.phase_started) / (done - 1) if done > 1 else None
        eta = format_seconds(rate * (steps - done)) if rate is not None else "?"
        loss = f", loss {self.loss:.3f}" if self.loss is not None else ""
        return (f"  {name}: step {done}/{steps}{loss}, ETA {eta} "
                f"(model {index + 1}/{len(self.phases)}; {format_seconds(now - self.started)} so far)")

    # -- output --------------------------------------------------------------------------

    def _print(self, text: str) -> None:
        print(text, file=self.out or sys.stdout, flush=True)

    def log(self, message: str) -> None:
        """The build's own line (a finished model, the grid, ...), printed at once."""
        self._print(message)
        self.last_line = self.clock()

    def _tick(self) -> None:
        if self.clock() - self.last_line >= self.every:
            self._print(self.line())
            self.last_line = self.clock()

    # -- torch hooks ---------------------------------------------------------------------

    def on_step(self, *_: Any) -> None:
        """An optimizer step (torch's global post-step hook)."""
        self.steps += 1
        self._want_loss = True
        if self.phase()[2] == 1:  # a model's first step
            self.phase_started = self.clock()
        if self.training_done:
            self.eval_started = self.clock()
        self._tick()

    def on_forward(self, module: Any, _inputs: Any, output: Any) -> None:
        """Any module's forward (torch's global forward hook): the model's own output carries
        ``loss`` (training: the first forward after a step is the skill's batch, as the build
        logs it) or ``logits`` (evaluation: one scored batch)."""
        if getattr(output, "logits", None) is None:
            return
        if module.training:
            loss = getattr(output, "loss", None)
            if loss is not None and self._want_loss:
                self.loss, self._want_loss = float(loss.detach()), False
        elif self.training_done:
            self.batches += 1
            self._tick()

    def __enter__(self) -> BuildProgress:
        from torch.nn.modules.module import register_module_forward_hook
        from torch.optim.optimizer import register_optimizer_step_post_hook

        self.started = self.phase_started = self.last_line = self.clock()
        self._handles = [register_optimizer_step_post_hook(self.on_step),
                         register_module_forward_hook(self.on_forward)]
        return self

    def __exit__(self, *_: Any) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
