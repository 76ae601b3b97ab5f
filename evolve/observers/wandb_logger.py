"""Weights & Biases logging of a run (imported only with ``--wandb``).

Per evaluation: its fitness, per-task scores, timings and the best fitness so far.  Per
generation: best/mean/std of the fitness and of every task score, CMA-ES sigma, and the
generation's genomes as a table.  On each new best: ``best_config.yaml`` as an artifact.  The
baselines (:mod:`evolve.baselines`) go to the summary (``baseline/<name>/fitness``,
``best_parent_fitness``), and the best's gain over the best parent to the summary
(``best_gain_over_parents``) and the time series (``best/gain_over_parents``).
A multi-objective run also logs its front's hypervolume per evaluation and the front as a table
per generation (:mod:`evolve.observers.pareto_log`).
``WANDB_MODE=offline`` (or ``disabled``) works with no key and no network.

One W&B run per storage path: its id is made at the first start from the storage path and a
random part, and kept in ``STORAGE/wandb_run_id``, so a resumed run continues it and two storage
paths never share one (``WANDB_RUN_ID`` overrides it).  W&B's environment is honoured where the
command line says nothing: ``WANDB_PROJECT`` and ``WANDB_ENTITY`` (``--wandb-project`` /
``--wandb-entity`` win), ``WANDB_RUN_GROUP``, and ``WANDB_DIR`` (default: the run directory).
The genome table's columns are the genes' names (:meth:`evolve.genome.Genome.gene_names`).
"""

from __future__ import annotations

import hashlib
import os
import statistics
import uuid
from pathlib import Path
from typing import Any

from evolve.baselines import baseline_summary, best_parent
from evolve.config import config_hash, normalized_config
from evolve.observers.pareto_log import ParetoLog
from evolve.observers.summary import best_train_fitness, train_count
from merge_core.fsutil import atomic_write

RUN_ID_FILE = "wandb_run_id"
DEFAULT_PROJECT = "merge-evolve"


class WandbObserver:
    """Search observer that mirrors the ledger to a W&B run."""

    def __init__(self, config: Any, *, project: str | None, entity: str | None, run_dir: Path,
                 seed: int) -> None:
        import wandb

        self._wandb = wandb
        env = os.environ
        self.run = wandb.init(project=project or env.get("WANDB_PROJECT") or DEFAULT_PROJECT,
                              entity=entity or env.get("WANDB_ENTITY") or None,
                              group=env.get("WANDB_RUN_GROUP") or None,
                              dir=env.get("WANDB_DIR") or str(run_dir),
                              config={"evolve": normalized_config(config), "seed": seed,
                                      "config_hash": config_hash(config)},
                              resume="allow", id=env.get("WANDB_RUN_ID") or run_id(run_dir))
        self.gene_names: list[str] | None = None  # from the driver's genome, at on_start
        self.best: float | None = None
        self.parent: float | None = None  # the best parent's train fitness
        self.evaluations = 0
        self.pareto: ParetoLog | None = None  # a multi-objective run's front

    def on_start(self, driver: Any) -> None:
        self.gene_names = driver.genome.gene_names()
        self.best = best_train_fitness(driver.records.values())
        self.evaluations = train_count(driver.records.values())
        self.pareto = ParetoLog.for_driver(driver)
        summary = baseline_summary(driver.records.values())
        for entry in summary:
            for key in ("fitness", "held_out_fitness"):
                if entry[key] is not None:
                    self.run.summary[f"baseline/{entry['name']}/{key}"] = entry[key]
        parent = best_parent(summary)
        if parent is not None:
            self.parent = parent["fitness"]
            self.run.summary["best_parent"] = parent["name"]
            self.run.summary["best_parent_fitness"] = parent["fitness"]

    def on_record(self, record: dict[str, Any]) -> None:
        if record.get("kind") == "held_out":
            data = {"held_out/fitness": record["fitness"]}
            data.update({f"held_out/{k}": v for k, v in _flat_scores(record).items()})
            self.run.log(data)
            return
        self.evaluations += 1
        if record["status"] == "ok" and (self.best is None or record["fitness"] > self.best):
            self.best = record["fitness"]
        data: dict[str, Any] = {"evaluation": self.evaluations, "eval/fitness": record["fitness"],
                                "eval/failed": int(record["status"] == "failed"),
                                "eval/cached": int(record.get("cached_from") is not None)}
        if self.best is not None:
            data["best/fitness"] = self.best
            if self.parent is not None:
                data["best/gain_over_parents"] = self.best - self.parent
        data.update({f"eval/{k}": v for k, v in _flat_scores(record).items()})
        data.update({f"timing/{k}": v for k, v in (record.get("timings") or {}).items()})
        if self.pareto is not None:
            data.update(self.pareto.observe(record))
        self.run.log(data)

    def on_generation(self, number: int, records: list[dict[str, Any]], sigma: float) -> None:
        ok = [r for r in records if r["status"] == "ok"]
        data: dict[str, Any] = {"generation": number, "gen/sigma": sigma,
                                "gen/failed": len(records) - len(ok)}
        if ok:
            fit = [r["fitness"] for r in ok]
            data.update({"gen/best": max(fit), "gen/mean": statistics.fmean(fit),
                         "gen/std": statistics.pstdev(fit)})
            per_task: dict[str, list[float]] = {}
            for r in ok:
                for k, v in _flat_scores(r).items():
                    per_task.setdefault(k, []).append(v)
            for k, values in per_task.items():
                data[f"gen/{k}/mean"] = statistics.fmean(values)
                data[f"gen/{k}/std"] = statistics.pstdev(values)
        width = len(records[0]["x"])
        genes = self.gene_names if self.gene_names and len(self.gene_names) == width else None
        columns = ["eval_id", "fitness", "status"] + (genes or [f"x{i}" for i in range(width)])
        rows = [[r["eval_id"], r["fitness"], r["status"], *r["x"]] for r in records]
        data["gen/genomes"] = self._wandb.Table(columns=columns, data=rows)
        if self.pareto is not None:
            front_columns, front_rows = self.pareto.table()
            data["pareto/front"] = self._wandb.Table(columns=front_columns, data=front_rows)
        self.run.log(data)

    def on_new_best(self, record: dict[str, Any], recipe: dict[str, Any], best_config: Any) -> None:
        self.run.summary["best_fitness"] = record["fitness"]
        self.run.summary["best_eval_id"] = record["eval_id"]
        if self.parent is not None:
            self.run.summary["best_gain_over_parents"] = record["fitness"] - self.parent
        if best_config is None:
            return
        artifact = self._wandb.Artifact("best_config", type="merge-recipe",
                                        metadata={"eval_id": record["eval_id"], "fitness": record["fitness"]})
        artifact.add_file(str(best_config))
        self.run.log_artifact(artifact)

    def close(self) -> None:
        """Finish the W&B run."""
        self.run.finish()


def run_id(run_dir: Path) -> str:
    """The W&B run id of the run stored in ``run_dir``: read from ``run_dir/wandb_run_id``, or
    made at the first start (``me-<hash of the absolute path>-<random>``) and written there
    atomically (the caller holds the run's lock).  Unique per storage path, kept across resumes;
    a copied or moved run directory keeps its id (it is the same run)."""
    path = Path(run_dir) / RUN_ID_FILE
    if path.exists():
        stored = path.read_text(encoding="utf-8").strip()
        if stored:
            return stored
    place = hashlib.sha256(str(Path(run_dir).resolve()).encode()).hexdigest()[:8]
    new = f"me-{place}-{uuid.uuid4().hex[:8]}"
    atomic_write(path, (new + "\n").encode())
    return new


def _flat_scores(record: dict[str, Any]) -> dict[str, float]:
    """Numeric task scores of a ledger record as ``{"task:metric": value}``."""
    out: dict[str, float] = {}
    for task, value in (record.get("scores") or {}).items():
        if isinstance(value, dict):
            out.update({f"{task}:{m}": v for m, v in value.items() if isinstance(v, (int, float))})
        elif isinstance(value, (int, float)):
            out[task] = value
    return out
