"""Weights & Biases logging of a run (imported only with ``--wandb``).

Per evaluation: its fitness, per-task scores, timings and the best fitness so far.  Per
generation: best/mean/std of the fitness and of every task score, CMA-ES sigma, and the
generation's genomes as a table.  On each new best: ``best_config.yaml`` as an artifact.
``WANDB_MODE=offline`` (or ``disabled``) works with no key and no network.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from evolve.config import config_hash, normalized_config
from evolve.observers.summary import best_train_fitness, train_count


class WandbObserver:
    """Search observer that mirrors the ledger to a W&B run."""

    def __init__(self, config: Any, *, project: str | None, entity: str | None, run_dir: Path,
                 seed: int) -> None:
        import wandb

        self._wandb = wandb
        self.run = wandb.init(project=project or "merge-evolve", entity=entity, dir=str(run_dir),
                              config={"evolve": normalized_config(config), "seed": seed,
                                      "config_hash": config_hash(config)},
                              resume="allow", id=f"me-{config_hash(config)[:12]}-s{seed}")
        self.best: float | None = None
        self.evaluations = 0

    def on_start(self, driver: Any) -> None:
        self.best = best_train_fitness(driver.records.values())
        self.evaluations = train_count(driver.records.values())

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
        data.update({f"eval/{k}": v for k, v in _flat_scores(record).items()})
        data.update({f"timing/{k}": v for k, v in (record.get("timings") or {}).items()})
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
        columns = ["eval_id", "fitness", "status"] + [f"x{i}" for i in range(len(records[0]["x"]))]
        rows = [[r["eval_id"], r["fitness"], r["status"], *r["x"]] for r in records]
        data["gen/genomes"] = self._wandb.Table(columns=columns, data=rows)
        self.run.log(data)

    def on_new_best(self, record: dict[str, Any], recipe: dict[str, Any], best_config: Any) -> None:
        self.run.summary["best_fitness"] = record["fitness"]
        self.run.summary["best_eval_id"] = record["eval_id"]
        if best_config is None:
            return
        artifact = self._wandb.Artifact("best_config", type="merge-recipe",
                                        metadata={"eval_id": record["eval_id"], "fitness": record["fitness"]})
        artifact.add_file(str(best_config))
        self.run.log_artifact(artifact)

    def close(self) -> None:
        """Finish the W&B run."""
        self.run.finish()


def _flat_scores(record: dict[str, Any]) -> dict[str, float]:
    """Numeric task scores of a ledger record as ``{"task:metric": value}``."""
    out: dict[str, float] = {}
    for task, value in (record.get("scores") or {}).items():
        if isinstance(value, dict):
            out.update({f"{task}:{m}": v for m, v in value.items() if isinstance(v, (int, float))})
        elif isinstance(value, (int, float)):
            out[task] = value
    return out
