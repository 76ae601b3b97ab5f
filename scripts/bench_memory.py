"""Host memory of N evaluation workers on one machine: one shared copy of the inputs, or N.

    python scripts/bench_memory.py [--params 100M] [--workers 2] [--method task_arithmetic]
                                   [--workdir /tmp/bench_merge]

Builds (once, shared with scripts/bench_merge.py) three bf16 Llama checkpoints of about
``--params`` parameters, then for ``MERGE_CORE_SHARE_INPUTS=1`` (the default: inputs mapped from
the page cache) and ``=0`` (a private copy per worker, as before) starts ``--workers`` Ray actors
on a local Ray, each holding an :class:`~merge_core.in_memory.InMemoryMerger` of the three
models in bf16 (the evolve recipes' dtype) and merging one candidate into its own state dict,
as a worker does.  Prints per actor and in total: RSS, PSS (``/proc/<pid>/smaps_rollup``: a page
shared by k processes counts 1/k in each) and the PSS the inputs, state and caches added to the
actor (after minus before), with the merger's own ``memory_report()`` line.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))


def smaps(pid: int) -> dict[str, int]:
    """Rss and Pss of process ``pid`` in bytes (smaps_rollup)."""
    out = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("Rss", "Pss"):
            out[key] = int(rest.split()[0]) * 1024
    return out


class Holder:
    """A Ray actor holding one worker's merge state (inputs, merged state dict, caches)."""

    def setup(self, recipe: dict, share: bool) -> dict:
        import torch

        from merge_core.in_memory import InMemoryMerger
        from merge_core.planner import plan_merge
        from merge_core.recipe import recipe_from_dict

        torch.set_num_threads(1)
        before = smaps(os.getpid())
        plan = plan_merge(recipe_from_dict(recipe), seed=0)
        self.merger = InMemoryMerger(plan, share=share)
        self.state = self.merger.merged_state_dict(plan)  # a candidate merged, as into a worker's model
        state = sum(t.numel() * t.element_size() for t in self.state.values())
        return {"pid": os.getpid(), "before": before,
                "report": f"{self.merger.memory_report()}; merged state: {state / (1 << 20):.2f} MiB"}

    def measure(self) -> dict[str, int]:
        return smaps(os.getpid())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="100M")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--method", default="task_arithmetic")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/bench_merge"))
    args = parser.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray
    from bench_merge import build_models

    target = float(args.params.rstrip("MB")) * (1e9 if args.params.endswith("B") else 1e6)
    base, ft1, ft2 = map(str, build_models(args.workdir / args.params, target))
    params = {"weight": 0.5} if args.method in ("task_arithmetic", "linear") else {"weight": 0.5, "density": 0.5}
    recipe = {"merge_method": args.method, "dtype": "bfloat16",
              "models": [{"model": ft1, "parameters": params}, {"model": ft2, "parameters": params}]}
    if args.method != "linear":
        recipe["base_model"] = base
    gib = 1 << 30
    ray.init(num_cpus=args.workers, include_dashboard=False, log_to_driver=False, logging_level="ERROR",
             _node_ip_address="127.0.0.1", runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}})
    try:
        actor_class = ray.remote(num_cpus=1)(Holder)
        for share in (True, False):
            actors = [actor_class.remote() for _ in range(args.workers)]
            infos = ray.get([a.setup.remote(recipe, share) for a in actors])
            after = ray.get([a.measure.remote() for a in actors])
            label = "shared (mapped from the page cache)" if share else "private copy per worker"
            print(f"\n== {args.workers} workers, inputs {label} ==")
            print(f"  {infos[0]['report']}")
            for k, (info, now) in enumerate(zip(infos, after)):
                print(f"  worker {k} (pid {info['pid']}): RSS {now['Rss'] / gib:.2f} GiB, PSS {now['Pss'] / gib:.2f} GiB")
            total_rss = sum(a["Rss"] for a in after)
            total_pss = sum(a["Pss"] for a in after)
            runtime = sum(i["before"]["Pss"] for i in infos)
            print(f"  total: RSS {total_rss / gib:.2f} GiB, PSS {total_pss / gib:.2f} GiB, of which "
                  f"{(total_pss - runtime) / gib:.2f} GiB inputs + merged states + caches "
                  f"({runtime / gib:.2f} GiB: the workers' Python/torch before loading)")
            for actor in actors:
                ray.kill(actor)
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main()
