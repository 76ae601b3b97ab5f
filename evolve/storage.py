"""What a run keeps under ``--storage-path``, written so that a kill at any instant is harmless.

- ``evaluations.jsonl``: the ledger, one JSON object per line, append-only. A line is written
  whole, flushed and fsynced before the result counts; a torn last line (kill mid-write) is cut
  off when the ledger is next opened.
- ``run.json``: the run manifest (config, seed, search settings, versions, start time, budget);
  a resume with different settings is refused, naming the first difference.
- ``best_config.yaml``: the best recipe, provenance as leading ``#`` comments, and
  ``best_config.provenance.json`` beside it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable

import yaml

from evolve.racing import stopped_early
from merge_core.errors import MergeError
from merge_core.fsutil import atomic_write

LEDGER = "evaluations.jsonl"
MANIFEST = "run.json"
BEST_CONFIG = "best_config.yaml"
BEST_PROVENANCE = "best_config.provenance.json"
FINAL_MODEL = "final_model"  # the best recipe merged at the end of a run


def best_record(train: Iterable[dict[str, Any]], provenance: dict[str, Any] | None) -> dict[str, Any] | None:
    """The run's best train record as the reports name it: the one ``best_config`` was written
    for (the search's incumbent, ``provenance``: its provenance JSON), else the best successful
    record scored on every document (a raced candidate stopped early has only an estimate; the
    feasible first, :func:`candidate_rank`; the first of equals), else None.  During an asynchronous run the ledger may hold a better result
    not yet told to the search: it becomes the incumbent at its tell."""
    ok = [r for r in train if r.get("status") == "ok"]
    chosen = (provenance or {}).get("eval_id")
    for rec in ok:
        if rec["eval_id"] == chosen:
            return rec
    full = [r for r in ok if not stopped_early(r)]
    return max(full, key=candidate_rank) if full else None


def candidate_rank(record: dict[str, Any]) -> tuple[bool, float, float]:
    """How a train record ranks, larger better: feasible first (successful, above every task
    floor: no ``violation``), then the least violation, then the weighted fitness."""
    violation = float(record.get("violation") or 0.0)
    return (record.get("status") == "ok" and violation == 0.0, -violation, float(record.get("fitness") or 0.0))


class StorageError(MergeError):
    """The storage directory holds something we cannot continue from (one line)."""


def first_difference(old: Any, new: Any, path: str = "") -> str | None:
    """YAML-style path of the first place two JSON values differ, or None when equal."""
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(set(old) | set(new), key=str):
            sub = f"{path}.{key}" if path else str(key)
            if key not in old or key not in new:
                return sub
            found = first_difference(old[key], new[key], sub)
            if found is not None:
                return found
        return None
    if isinstance(old, list) and isinstance(new, list):
        for i, (a, b) in enumerate(zip(old, new)):
            found = first_difference(a, b, f"{path}[{i}]")
            if found is not None:
                return found
        return None if len(old) == len(new) else f"{path} (length {len(old)} vs {len(new)})"
    return None if old == new and type(old) is type(new) else (path or "<root>")


def _lookup(data: Any, path: str) -> Any:
    """Best-effort value at a first_difference path, for the error message."""
    cur = data
    for part in path.replace("[", ".[").split("."):
        if not part or cur is None:
            continue
        try:
            cur = cur[int(part[1:-1])] if part.startswith("[") else cur.get(part)
        except (ValueError, IndexError, AttributeError, TypeError):
            return None
    return cur


class RunStorage:
    """One run's directory; all writes are atomic or append-whole-line.

    Nothing is created until :meth:`open_run`: reading a run (``report``, the checks before a
    run starts) never writes.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._ledger_checked = False

    @property
    def ledger_path(self) -> Path:
        """The ledger file (``evaluations.jsonl``)."""
        return self.path / LEDGER

    def _writable(self) -> Path:
        """The directory, created on the first write."""
        self.path.mkdir(parents=True, exist_ok=True)
        return self.path

    # -- ledger ---------------------------------------------------------------------------

    def load_evaluations(self, *, repair: bool = True) -> list[dict[str, Any]]:
        """All ledger records in file order.

        A torn last line (a kill mid-write) is skipped; with ``repair`` (the run that will append
        next) it is also cut from the file.  ``repair=False`` reads only (``report``, checks).
        """
        if not self.ledger_path.exists():
            self._ledger_checked = repair
            return []
        data = self.ledger_path.read_bytes()
        records: list[dict[str, Any]] = []
        # Every append is one write of "json\n": text after the last newline is a torn write.
        lines = data.split(b"\n")[:-1]
        good_end = 0
        for number, line in enumerate(lines, start=1):
            try:
                record = json.loads(line)
            except ValueError:
                record = None
            if not isinstance(record, dict):
                if number == len(lines):
                    break  # a damaged last line (crash mid-write): drop it like a torn one
                raise StorageError(
                    f"{self.ledger_path}: line {number} of {len(lines)} is not a JSON record: the ledger is "
                    "damaged (a torn write can only hit the last line); restore it from a backup, or delete "
                    f"lines {number}.. to lose those evaluations, or start a new --storage-path")
            records.append(record)
            good_end += len(line) + 1
        if not repair:
            return records
        if good_end < len(data):
            with open(self.ledger_path, "r+b") as fh:
                fh.truncate(good_end)
                fh.flush()
                os.fsync(fh.fileno())
        self._ledger_checked = True
        return records

    def append_evaluation(self, record: dict[str, Any]) -> None:
        """Append one record as a whole line and make it durable before returning."""
        if not self._ledger_checked:
            self.load_evaluations()  # cut a torn tail first, or the new line would join it
        line = json.dumps(record, sort_keys=True, allow_nan=False, separators=(",", ":")) + "\n"
        self._writable()
        with open(self.ledger_path, "ab") as fh:
            fh.write(line.encode())
            fh.flush()
            os.fsync(fh.fileno())

    # -- manifest -------------------------------------------------------------------------

    def read_provenance(self) -> dict[str, Any] | None:
        """``best_config``'s provenance, or None when there is none yet or it cannot be read (the
        reports show a run whatever state its files are in)."""
        try:
            data = json.loads((self.path / BEST_PROVENANCE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    def read_manifest(self) -> dict[str, Any] | None:
        """The stored run manifest, or None for a new run; StorageError when it is damaged."""
        path = self.path / MANIFEST
        if not path.exists():
            return None
        try:
            manifest = json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, OSError) as exc:
            raise StorageError(f"{path}: the run manifest is damaged ({exc}); it is rewritten atomically, so "
                               "something else changed it: restore it from a backup or start a new "
                               "--storage-path") from None
        if not isinstance(manifest, dict):
            raise StorageError(f"{path}: the run manifest is damaged (not a JSON object); restore it from a "
                               "backup or start a new --storage-path")
        return manifest

    def write_manifest(self, manifest: dict[str, Any]) -> None:
        atomic_write(self._writable() / MANIFEST, (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode())

    def check_resumable(self, manifest: dict[str, Any], must_match: Iterable[str],
                        defaults: dict[str, Any] | None = None) -> dict[str, Any] | None:
        """The stored manifest when ``manifest`` may continue it (None: no run stored yet).

        ``defaults``: what a manifest written before a key existed means by its absence.
        Raises StorageError naming the first ``must_match`` setting that differs.  Writes nothing.
        """
        old = self.read_manifest()
        if old is not None:
            old = {**(defaults or {}), **old}
        if old is None:
            # Baselines (evolve.baselines) are scored before the search opens the run: a ledger
            # of only those is a run killed before its search started.
            if any(r.get("kind") != "baseline" for r in self.load_evaluations(repair=False)):
                raise StorageError(f"{self.path}: has evaluations but no {MANIFEST}; use a new --storage-path")
            return None
        for key in must_match:
            where = first_difference(old.get(key), manifest.get(key), key)
            if where is not None:
                raise StorageError(
                    f"{self.path}: cannot resume, {where} differs from the stored run "
                    f"({_short(_lookup(old, where))} there, {_short(_lookup(manifest, where))} now);"
                    " use a new --storage-path"
                )
        return old

    def open_run(self, manifest: dict[str, Any], must_match: Iterable[str],
                 defaults: dict[str, Any] | None = None) -> dict[str, Any]:
        """Start or resume: create the directory and write ``manifest`` if new, else check the
        ``must_match`` keys (:meth:`check_resumable`).

        Returns the stored manifest (updated with the new values of keys that may change, such
        as the budget). Raises StorageError naming the first differing setting.
        """
        old = self.check_resumable(manifest, must_match, defaults)
        if old is None:
            self.write_manifest(manifest)
            return manifest
        merged = {**manifest, **{k: old[k] for k in ("started",) if k in old}}
        if merged != old:
            self.write_manifest(merged)
        return merged

    # -- best recipe ----------------------------------------------------------------------

    def write_best_config(self, recipe_yaml: str, provenance: dict[str, Any]) -> Path:
        """Write ``best_config.yaml`` (provenance as leading comments) and its JSON sidecar."""
        # The comments show 12 significant digits (0.2085, not 0.20850000000000002: float noise
        # of a weighted sum); the JSON sidecar keeps every bit.
        header = yaml.safe_dump(readable_floats(provenance), sort_keys=False, default_flow_style=None, width=100)
        comments = "".join(f"# {line}\n" if line else "#\n" for line in header.splitlines())
        text = "# merge-evolve best recipe; provenance:\n" + comments + recipe_yaml
        if not text.endswith("\n"):
            text += "\n"
        sidecar = json.dumps(provenance, indent=2, sort_keys=True, allow_nan=False) + "\n"
        atomic_write(self._writable() / BEST_PROVENANCE, sidecar.encode())
        atomic_write(self.path / BEST_CONFIG, text.encode())
        return self.path / BEST_CONFIG


def readable_floats(value: Any) -> Any:
    """``value`` with every float rounded to 12 significant digits (containers copied)."""
    if isinstance(value, float):
        return float(f"{value:.12g}")
    if isinstance(value, dict):
        return {k: readable_floats(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [readable_floats(v) for v in value]
    return value


def _short(value: Any) -> str:
    text = json.dumps(value, sort_keys=True) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
