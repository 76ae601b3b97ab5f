"""A run directory as the HTML report reads it: read-only, safe while the run is going.

:func:`load_run` reads the ledger (a torn last line is skipped, never cut), the manifest, the
best recipe and its provenance, and whether a run holds the directory now.  Nothing is written.
"""

from __future__ import annotations

import errno
import os
import time
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from evolve.baselines import baseline_summary
from evolve.protocols import HELD_OUT, TRAIN
from merge_core.errors import RecipeError

__all__ = ["RunData", "load_run", "run_is_live"]


def run_is_live(storage_path: Path) -> bool:
    """Whether a run holds ``STORAGE/.lock`` now (tested with a shared lock, released at once;
    the file is opened read-only and never created)."""
    import fcntl

    from evolve.lock import LOCK_FILE

    try:
        fd = os.open(storage_path / LOCK_FILE, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError as exc:  # held by a run; any other error (no locks on this file system) is not
        return exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN)
    finally:
        os.close(fd)  # closing drops the shared lock if it was taken
    return False


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None


@dataclass
class RunData:
    """Everything the report shows, as read from one run directory."""

    path: Path
    manifest: dict[str, Any]
    records: list[dict[str, Any]]  # the ledger in file order (ask records included)
    provenance: dict[str, Any] | None = None  # best_config.provenance.json
    best_recipe_text: str | None = None  # best_config.yaml
    config_text: str | None = None  # config.yml as the user wrote it
    live: bool = False  # a run holds the directory now
    generated: float = field(default_factory=time.time)

    @cached_property
    def train(self) -> list[dict[str, Any]]:
        """Train records (evaluated and cache hits) in the order they were recorded."""
        return [r for r in self.records if r.get("kind") == TRAIN]

    @cached_property
    def held_out(self) -> dict[str, dict[str, Any]]:
        """The latest held-out record per train id it re-scores."""
        return {r["of"]: r for r in self.records if r.get("kind") == HELD_OUT}

    @cached_property
    def baselines(self) -> list[dict[str, Any]]:
        """:func:`evolve.baselines.baseline_summary` of the ledger."""
        return baseline_summary(self.records)

    @property
    def asked(self) -> int:
        """Candidates asked so far (ask records)."""
        return sum(1 for r in self.records if r.get("kind") == "ask")

    @cached_property
    def best(self) -> dict[str, Any] | None:
        """The incumbent (:func:`evolve.storage.best_record`)."""
        from evolve.storage import best_record

        return best_record(self.train, self.provenance)

    @cached_property
    def best_held_out(self) -> dict[str, Any] | None:
        """The best's held-out record when it was scored successfully."""
        best = self.best
        held = self.held_out.get(best["eval_id"]) if best else None
        return held if held is not None and held.get("status") == "ok" else None

    @property
    def last_update(self) -> float | None:
        """Unix time of the latest result in the ledger."""
        times = [(r.get("timings") or {}).get("done_unix") for r in self.records]
        found = [t for t in times if isinstance(t, (int, float))]
        return max(found) if found else None

    @cached_property
    def config(self) -> Any:
        """The run's :class:`~evolve.config.EvolveConfig` (from the manifest, else config.yml),
        or None when neither is readable."""
        from evolve.config import load_evolve_config, parse_evolve_config
        from merge_core.errors import MergeError

        try:
            if "config" in self.manifest:
                return parse_evolve_config(self.manifest["config"])
            if (self.path / "config.yml").is_file():
                return load_evolve_config(self.path / "config.yml")
        except (MergeError, OSError, ValueError):
            return None
        return None

    @cached_property
    def genome(self) -> Any:
        """The run's :class:`~evolve.genome.Genome` (with its stored search box), or None."""
        from evolve.genome import Genome

        config, layers = self.config, self.manifest.get("num_layers")
        if config is None or not isinstance(layers, int):
            return None
        if config.stacking is not None:
            from evolve.stacking_genome import StackingGenome
            from evolve.stacking_sources import source_refs

            s = config.stacking
            return StackingGenome(source_refs(s, self.path), layers, slots=s.slots, min_layers=s.min_layers,
                                  max_layers=s.max_layers)
        return Genome.for_run(config.genome, layers, self.manifest)


def load_run(storage_path: Path, *, live: bool | None = None) -> RunData:
    """Read a run directory (see the module docstring); ``live`` None: test the run's lock.

    Raises :class:`~merge_core.errors.RecipeError` (``--storage-path``) when it holds no run.
    """
    from evolve.ledger_check import readable_records
    from evolve.storage import BEST_CONFIG, LEDGER, MANIFEST, RunStorage

    storage_path = Path(storage_path)
    if not (storage_path / LEDGER).exists() and not (storage_path / MANIFEST).exists():
        raise RecipeError("--storage-path", f"'{storage_path}' holds no merge-evolve run")
    storage = RunStorage(storage_path)
    records, _ = readable_records(storage.load_evaluations(repair=False))  # `report` warns about the rest
    manifest = storage.read_manifest() or {}
    return RunData(path=storage_path, manifest=manifest, records=records, provenance=storage.read_provenance(),
                   best_recipe_text=_read_text(storage_path / BEST_CONFIG),
                   config_text=_read_text(storage_path / "config.yml"),
                   live=run_is_live(storage_path) if live is None else live)
