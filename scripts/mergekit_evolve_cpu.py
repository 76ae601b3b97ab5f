"""Run mergekit-evolve 0.1.5 (the tool merge-evolve replaces) on a CPU-only machine, for benchmarks.

Usage, with the mergekit venv's python (deps: ``bash scripts/setup_mergekit_evolve.sh``)::

    .venv-mergekit/bin/python scripts/mergekit_evolve_cpu.py CONFIG --storage-path DIR \
        --task-search-path eval_tasks --max-fevals 20 --no-wandb --random-seed 0 --num-gpus 2

All arguments are mergekit-evolve's own; they are handed to its click ``main`` unchanged except
for two defaults this wrapper adds when they are not given:

* ``--no-merge-cuda``: mergekit-evolve defaults to ``--merge-cuda``, i.e. ``MergeOptions(cuda=True,
  read_to_gpu=True)`` and device "cuda" for merging. With ``--no-merge-cuda`` the merge runs on CPU.
* ``--num-gpus 1``: the number of evaluation workers (Ray actors). Without it mergekit-evolve asks
  torch for the accelerator count, gets 0 on CPU and builds an empty actor pool. On CPU read it as
  "number of workers"; each worker takes one core (Ray gives it ``OMP_NUM_THREADS=1``).

No file of the installed mergekit is changed (that venv is rebuilt from PyPI). The runtime patches,
applied in this process AND in every Ray worker process (through Ray's job-wide
``runtime_env={"worker_process_setup_hook": ...}``, which runs in each worker before it loads any
task or actor class):

1. Stub ``lm_eval.models.vllm_causallms`` when vLLM is not installed. ``mergekit/evo/actors.py``
   names ``lm_eval.models.vllm_causallms.VLLM`` in a class annotation at import time, and
   ``monkeypatch_lmeval_vllm()`` (called in every actor and every evaluation) imports that module
   and sets ``VLLM.AUTO_MODEL_CLASS``. lm-eval 0.4.x imports ``vllm`` at the top of that module, so
   without vLLM (GPU-only wheel here) ``mergekit-evolve`` dies at import with
   ``AttributeError: module 'lm_eval.models' has no attribute 'vllm_causallms'``. The stub holds a
   placeholder ``VLLM`` class; ``--vllm`` is therefore unsupported (it would fail when used).
2. Give Ray logical "GPU" slots. Every mergekit-evolve actor/task is declared with
   ``num_gpus=1`` (``OnDiskMergeEvaluator``, ``InMemoryMergeEvaluator``, ``merge_model_ray``,
   ``evaluate_model_ray``, the serial strategy's placement group), so on a node with no GPU they
   stay pending forever. The wrapper calls ``ray.init(num_gpus=<--num-gpus>)`` itself (mergekit
   relies on Ray's implicit init); the slots are only scheduling tokens: nothing uses CUDA.
3. ``torch.cpu.empty_cache`` no-op. ``OnDiskMergeEvaluator.evaluate_genotype`` calls
   ``get_torch_accelerator_module(device).empty_cache()``; for device "cpu" that is ``torch.cpu``,
   which has no ``empty_cache`` (AttributeError).
4. Evaluate on CPU in float32: wrap ``lm_eval.simple_evaluate`` (mergekit's ``_eval_model`` calls
   it as ``lm_eval.simple_evaluate``). mergekit's on-disk path passes ``model_args={"pretrained":
   path, "dtype": "bfloat16"}`` and no device; lm-eval's HFLM then defaults to ``device="cuda"``
   and fails to place the model. The wrapper sets ``device="cpu"`` and replaces a bfloat16 dtype
   with ``$MERGEKIT_EVOLVE_CPU_DTYPE`` (default float32: bf16 matmuls are ~4x slower than fp32 on
   this AVX2 CPU; set it to ``bfloat16`` to keep mergekit's dtype).
5. In-memory mode (``--in-memory``): ``InMemoryMergeEvaluator._maybe_init_model`` builds the
   model with a hard-coded ``.bfloat16()``; after it, the wrapper casts the HF model to the same
   evaluation dtype (merged tensors are then copied into it with ``copy_``, which casts).
6. Offline model card: after the search, mergekit-evolve merges the final model from the config's
   ORIGINAL model references (``zoo/base``...). ``mergekit.card.is_hf`` treats a local relative
   path with one "/" as a possible Hub repo id and calls ``huggingface_hub.repo_exists``, which
   with ``HF_HUB_OFFLINE=1`` raises ``OfflineModeIsEnabled`` and aborts the run after the whole
   search (``mergekit/card.py`` ``is_hf``, reached from ``run_merge`` -> ``generate_card``). The
   wrapper makes ``is_hf`` answer False for a path that exists locally when the Hub is offline.
7. Torch threads = Ray's CPU share. Ray gives each worker ``OMP_NUM_THREADS=<its num_cpus>`` (1
   for mergekit's actors) only when the actor's first task starts, but the setup hook above has
   already imported torch, whose thread pool then stays at all cores: two workers x two threads
   on two cores made the search ~3x slower. The wrapper calls ``torch.set_num_threads`` with
   ``OMP_NUM_THREADS`` when an actor starts (``MergeActorBase.__init__``) and before every
   evaluation (the ``simple_evaluate`` wrapper, which also covers the buffered/serial strategies'
   ``evaluate_model_ray`` tasks). This only restores what Ray does for a worker that has not
   imported torch before its first task (one thread per worker).
8. ``--in-memory`` only, a mergekit 0.1.5 bug not specific to CPU: ``MergePlanner.plan_in_memory``
   builds ``ReturnTensor(tensor_task=ExecuteMergeMethodTask(...))``, but ``ReturnTensor`` declares
   ``tensor_task: Task[torch.Tensor]`` while ``ExecuteMergeMethodTask`` subclasses
   ``Task[Optional[torch.Tensor]]``; pydantic does not accept it as an instance and tries to build
   the abstract generic from its fields: ``TypeError: Can't instantiate abstract class
   Task[Tensor] with abstract methods arguments, execute`` on the first evaluation
   (``mergekit/io/tasks.py`` ``ReturnTensor``, ``mergekit/plan.py`` ``plan_in_memory``). The wrapper
   re-declares the field as plain ``Task`` (as mergekit's own ``SaveTensor.tensor_task`` is) and
   rebuilds the model.

Merging itself is unchanged: mergekit still writes bfloat16 merges (its genome's ``dtype``) and
reshards the inputs to bfloat16, as it does on GPU.
"""

from __future__ import annotations

import os
import sys
import types


def _eval_dtype() -> str:
    return os.environ.get("MERGEKIT_EVOLVE_CPU_DTYPE", "float32")


def _patch_return_tensor() -> None:
    """Patch 8: ReturnTensor.tensor_task accepts any Task (in-memory planning)."""
    from mergekit.graph import Task
    from mergekit.io.tasks import ReturnTensor

    field = ReturnTensor.model_fields["tensor_task"]
    if field.annotation is not Task:
        field.annotation = Task
        ReturnTensor.model_rebuild(force=True)


def _match_omp_threads() -> None:
    """Inside a Ray worker, size torch's thread pool to the OMP_NUM_THREADS Ray assigned."""
    n = os.environ.get("OMP_NUM_THREADS")
    if n and n.isdigit() and int(n) >= 1:
        import torch

        if torch.get_num_threads() != int(n):
            torch.set_num_threads(int(n))


def _apply_patches() -> None:
    """Patches 1, 3-8 of the module docstring; idempotent, run in driver and workers."""
    import importlib.util

    import torch

    # 1. vLLM-less lm_eval.models.vllm_causallms
    if importlib.util.find_spec("vllm") is None:
        import lm_eval.models

        name = "lm_eval.models.vllm_causallms"
        if name not in sys.modules:
            stub = types.ModuleType(name)

            class VLLM:  # placeholder: only referenced, never instantiated without --vllm
                AUTO_MODEL_CLASS = None

                def __init__(self, *args, **kwargs):
                    raise RuntimeError("vLLM is not installed: run without --vllm")

            stub.VLLM = VLLM
            sys.modules[name] = stub
            lm_eval.models.vllm_causallms = stub

    # 3. torch.cpu has no empty_cache
    if not hasattr(torch.cpu, "empty_cache"):
        torch.cpu.empty_cache = lambda: None

    # 4. lm-eval on CPU, float32
    import lm_eval

    if not getattr(lm_eval, "_mk_cpu_patched", False):
        from lm_eval.evaluator import simple_evaluate as _orig_simple_evaluate

        def simple_evaluate(*args, **kwargs):
            _match_omp_threads()
            model_args = kwargs.get("model_args")
            if isinstance(model_args, dict):
                model_args = dict(model_args)
                if model_args.get("dtype") in ("bfloat16", torch.bfloat16):
                    model_args["dtype"] = _eval_dtype()
                model_args.setdefault("device", "cpu")
                kwargs["model_args"] = model_args
            if kwargs.get("device") is None and not isinstance(model_args, dict):
                kwargs["device"] = "cpu"
            return _orig_simple_evaluate(*args, **kwargs)

        lm_eval.simple_evaluate = simple_evaluate
        lm_eval._mk_cpu_patched = True

    import mergekit.evo.actors as actors

    # 7. actors: torch threads from Ray's OMP_NUM_THREADS (set when the actor starts)
    base = actors.MergeActorBase
    if not getattr(base, "_mk_cpu_patched", False):
        _orig_actor_init = base.__init__

        def __init__(self, *args, **kwargs):
            _match_omp_threads()
            _orig_actor_init(self, *args, **kwargs)

        base.__init__ = __init__
        base._mk_cpu_patched = True

    # 5. in-memory evaluator: model built in bf16 (patch the class that @ray.remote wraps)
    cls = actors.InMemoryMergeEvaluator.__ray_metadata__.modified_class
    if not getattr(cls, "_mk_cpu_patched", False):
        _orig_init_model = cls._maybe_init_model

        def _maybe_init_model(self, config):
            _orig_init_model(self, config)
            model = getattr(self.model, "model", None)
            dtype = getattr(torch, _eval_dtype())
            if isinstance(model, torch.nn.Module) and model.dtype != dtype:
                model.to(dtype)

        cls._maybe_init_model = _maybe_init_model
        cls._mk_cpu_patched = True

    # 8. in-memory planning: ReturnTensor's tensor_task type
    _patch_return_tensor()

    # 6. model card lookups of local paths in offline mode
    import mergekit.card as card

    if not getattr(card, "_mk_cpu_patched", False):
        _orig_is_hf = card.is_hf

        def is_hf(path: str) -> bool:
            import huggingface_hub.constants

            if huggingface_hub.constants.HF_HUB_OFFLINE and os.path.exists(path):
                return False
            return _orig_is_hf(path)

        card.is_hf = is_hf
        card._mk_cpu_patched = True


def _worker_setup() -> None:
    """Ray worker_process_setup_hook: same patches in every worker process."""
    _apply_patches()


def _option_value(args: list[str], name: str) -> str | None:
    for i, a in enumerate(args):
        if a == name and i + 1 < len(args):
            return args[i + 1]
        if a.startswith(name + "="):
            return a.split("=", 1)[1]
    return None


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if "--merge-cuda" not in args and "--no-merge-cuda" not in args:
        args.append("--no-merge-cuda")
    if _option_value(args, "--num-gpus") is None:
        args += ["--num-gpus", "1"]
    workers = int(_option_value(args, "--num-gpus"))

    _apply_patches()

    import ray

    # 2. logical GPU slots so num_gpus=1 actors/tasks can be scheduled on a CPU-only node
    if "--help" not in args and not ray.is_initialized():
        ray.init(
            num_cpus=max(os.cpu_count() or 1, workers),
            num_gpus=workers,
            include_dashboard=False,
            runtime_env={"worker_process_setup_hook": _worker_setup},
        )

    from mergekit.scripts.evolve import main as evolve_main

    evolve_main.main(args=args, prog_name="mergekit-evolve")


if __name__ == "__main__":
    main()
