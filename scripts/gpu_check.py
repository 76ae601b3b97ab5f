"""The checks of scripts/gpu_check.sh, one group per call: ``python scripts/gpu_check.py GROUP``.

Groups (each prints one ``PASS``/``FAIL``/``SKIP`` line per check and exits 1 on any FAIL):

- ``env``: the CUDA device, and which optional packages (lm-eval, vLLM) are importable.
- ``merge``: every merge method on tiny bf16 models, merged on the GPU three ways (in memory with
  the inputs resident on the GPU, in memory streamed from CPU memory, ``merge-yaml --device
  cuda``), against ``merge-yaml`` on the CPU.  Tolerance: at most 1 bf16 ulp (float32 roundings
  of the GPU and CPU kernels falling on the two sides of a bf16 boundary, counted), or float32
  rounding of the inputs where a result cancels to ~0; sce at ``select_topk < 1`` may also differ
  where the variance ties at its cut (torch.topk's choice among equal values is the device's).
  Needs torch, numpy, safetensors, pyyaml, pydantic (merge_core's recipes).
- ``hf``: the HF evaluator on the GPU (float32) gives the CPU's scores (multiple choice and
  generate_until toy tasks, random tiny models).  Needs lm-eval (+ transformers, accelerate).
- ``vllm``: the vLLM evaluator's scores equal the HF evaluator's for two candidates merged on
  the GPU and pushed into one running engine (CUDA graphs on: ``enforce_eager`` false, so a push
  that left captured graphs on stale weights would show).  Needs vLLM and lm-eval.
- ``bench``: ``scripts/bench_vllm.py --device cuda`` on random toy-shaped models.  Needs vLLM.

``--self-test`` runs the GPU side on the CPU instead (a machine without a GPU checks the
script itself: every comparison must then hold exactly).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]
TASK_DIR = REPO / "tests" / "data" / "vllm_tasks"  # toy_arith_gen (generate_until)
CANCEL = 2.0**-20
FAILED: list[str] = []


def report(status: str, name: str, detail: str) -> None:
    """One result line; a FAIL makes the group exit 1."""
    if status == "FAIL":
        FAILED.append(name)
    print(f"{status} {name}: {detail}", flush=True)


def has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def gpu(args: argparse.Namespace) -> str | None:
    """The device the checks compare with the CPU ("cpu" in self-test mode), None without one."""
    if args.self_test:
        return "cpu"
    import torch

    return "cuda" if torch.cuda.is_available() else None


def device_or_skip(args: argparse.Namespace, check: str, needs: dict[str, str]) -> str | None:
    """The device to compare with the CPU, or None after one SKIP line saying what is missing
    (``needs``: module -> why it is needed)."""
    device = gpu(args)
    missing = [f"{module} ({why})" for module, why in needs.items() if not has(module)]
    if device is None or missing:
        report("SKIP", check, "no CUDA device" if device is None else f"not installed: {', '.join(missing)}")
        return None
    return device


# -- env ------------------------------------------------------------------------------------


def check_env(args: argparse.Namespace) -> None:
    import torch

    optional = ", ".join(f"{m} {'yes' if has(m) else 'no'}" for m in ("pydantic", "lm_eval", "vllm"))
    if torch.cuda.is_available():
        report("PASS", "cuda", f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}, CUDA "
                               f"{torch.version.cuda}; importable: {optional}")
    else:
        report("SKIP", "cuda", f"no CUDA device (torch {torch.__version__}); importable: {optional}")


# -- merge ----------------------------------------------------------------------------------


def merge_models(root: Path) -> dict[str, Path]:
    """A bf16 base and three fine-tune-like bf16 models (base + 0.1 * random): 4 layers, hidden 64."""
    import torch
    from safetensors.torch import load_file, save_file

    from tiny_models import make_tiny_llama

    shape = {"hidden_size": 64, "intermediate_size": 160, "vocab_size": 128, "num_hidden_layers": 4}
    raw = {name: load_file(str(make_tiny_llama(root / f"raw_{name}", seed=seed, tokenizer=False, **shape)
                               / "model.safetensors")) for name, seed in (("base", 0), ("m1", 1), ("m2", 2), ("m3", 3))}
    out = {}
    for name, weights in raw.items():
        path = make_tiny_llama(root / name, seed=0, tokenizer=False, dtype=torch.bfloat16, **shape)
        merged = weights if name == "base" else {k: raw["base"][k] + 0.1 * v for k, v in weights.items()}
        save_file({k: v.to(torch.bfloat16) for k, v in merged.items()}, str(path / "model.safetensors"),
                  metadata={"format": "pt"})
        out[name] = path
    return out


def recipes(m: dict[str, Path]) -> dict[str, dict]:
    """One bf16 recipe per method (all of merge_core's), with gradients for the layer-wise path."""
    b, m1, m2, m3 = (str(m[k]) for k in ("base", "m1", "m2", "m3"))

    def tv(method: str, **per: object) -> dict:
        return {"merge_method": method, "base_model": b, "models": [
            {"model": m1, "parameters": {"weight": [0.3, 0.9], **per}},
            {"model": m2, "parameters": {"weight": 0.5, **per}}, {"model": m3, "parameters": {"weight": 0.4, **per}}]}

    out = {
        "linear": {"merge_method": "linear", "models": [{"model": m1, "parameters": {"weight": 0.6}},
                                                        {"model": m2, "parameters": {"weight": [0.2, 0.8]}}]},
        "task_arithmetic": tv("task_arithmetic"),
        "ties": tv("ties", density=[0.3, 0.7]), "dare_ties": tv("dare_ties", density=0.5),
        "dare_linear": tv("dare_linear", density=0.6), "breadcrumbs": tv("breadcrumbs", density=0.7, gamma=0.05),
        "breadcrumbs_ties": tv("breadcrumbs_ties", density=0.7, gamma=0.05),
        "della": tv("della", density=0.5, epsilon=0.1), "della_linear": tv("della_linear", density=0.6, epsilon=0.15),
        "sce": {"merge_method": "sce", "base_model": b, "models": [{"model": x} for x in (m1, m2, m3)]},
        "sce_topk": {"merge_method": "sce", "base_model": b, "parameters": {"select_topk": 0.5},
                     "models": [{"model": x} for x in (m1, m2, m3)]},
        "model_stock": {"merge_method": "model_stock", "base_model": b, "models": [{"model": x} for x in (m1, m2, m3)]},
        "slerp": {"merge_method": "slerp", "base_model": m1, "parameters": {"t": [0.2, 0.7]},
                  "models": [{"model": m1}, {"model": m2}]},
        "nuslerp": {"merge_method": "nuslerp", "base_model": b, "models": [
            {"model": m1, "parameters": {"weight": 0.4}}, {"model": m2, "parameters": {"weight": 0.6}}]},
        "multislerp": {"merge_method": "multislerp", "base_model": b, "models": [
            {"model": x, "parameters": {"weight": w}} for x, w in ((m1, [0.2, 0.6]), (m2, 0.3), (m3, 0.5))]},
        "karcher": {"merge_method": "karcher", "models": [{"model": x} for x in (m1, m2, m3)]},
        "nearswap": {"merge_method": "nearswap", "base_model": b, "parameters": {"t": [0.001, 0.01]},
                     "models": [{"model": m1}]},
        "arcee_fusion": {"merge_method": "arcee_fusion", "base_model": b, "models": [{"model": m1}]},
        "ram": {"merge_method": "ram", "base_model": b, "parameters": {"epsilon": 0.005},
                "models": [{"model": x} for x in (m1, m2, m3)]},
        "ramplus_tl": {"merge_method": "ramplus_tl", "base_model": b, "parameters": {"epsilon": 0.005, "r": 0.5},
                       "models": [{"model": x} for x in (m1, m2, m3)]},
    }
    return {name: {**r, "dtype": "bfloat16"} for name, r in out.items()}


def _ordered(x):  # bf16 bits in value order: neighbours differ by 1
    import torch

    bits = x.view(torch.int16).to(torch.int32)
    return torch.where(bits < 0, -(bits & 0x7FFF), bits)


def compare(name: str, got: dict, want: dict, inputs: list[dict], topk: float | None) -> tuple[bool, str]:
    """(within tolerance, counts) of ``got`` against ``want`` (see the module docstring)."""
    import torch

    n = differ = ulp1 = tied = 0
    for key, expected in want.items():
        actual = got[key].cpu()
        if actual.shape != expected.shape or actual.dtype != expected.dtype:
            return False, f"{key}: {actual.dtype}{tuple(actual.shape)} != {expected.dtype}{tuple(expected.shape)}"
        ulps = (_ordered(actual) - _ordered(expected)).abs()
        xs = [src[key].float() for src in inputs if key in src]
        scale = sum(x.abs() for x in xs) if xs else expected.float().abs()
        ok = (ulps <= 1) | ((actual.float() - expected.float()).abs() <= CANCEL * scale)
        if topk is not None and len(xs) > 1:  # sce: the variance of the task vectors ties at its cut
            var = torch.var(torch.stack([x - xs[0] for x in xs[1:]]), dim=0, unbiased=False)
            k = int(int(torch.count_nonzero(var)) * topk)
            at_cut = var == var.flatten().topk(k).values[-1] if k > 0 else torch.zeros_like(ok)
            tied += int((at_cut & (ulps > 1)).sum())
            ok |= at_cut
        if not bool(ok.all()):
            return False, f"{key}: {int((~ok).sum())} elements beyond 1 ulp (max {int(ulps.max())} ulps)"
        n += expected.numel()
        differ += int((ulps > 0).sum())
        ulp1 += int((ulps == 1).sum())
    extra = f", {tied} at sce's cut" if topk is not None else ""
    return True, f"{n} elements, {n - differ} identical, {ulp1} by 1 ulp{extra}"


def check_merge(args: argparse.Namespace) -> None:
    import torch
    import yaml
    from safetensors.torch import load_file

    device = device_or_skip(args, "merge cuda == cpu", {"pydantic": "merge_core's recipes"})
    if device is None:
        return
    from merge_core.cli import main as merge_yaml
    from merge_core.in_memory import InMemoryMerger
    from merge_core.planner import plan_merge
    from merge_core.recipe import recipe_from_dict

    root = args.workdir / "merge"
    models = merge_models(root / "models")
    loaded = {k: load_file(str(p / "model.safetensors")) for k, p in models.items()}
    for name, recipe in recipes(models).items():
        try:
            path = root / f"{name}.yml"
            path.write_text(yaml.safe_dump(recipe))
            outs = {}
            for dev in ("cpu", device):
                target = root / f"{name}-{dev}"
                assert merge_yaml([str(path), str(target), "--device", dev, "--quiet", "--no-copy-tokenizer"]) == 0
                outs[dev] = {k: v for f in sorted(target.glob("*.safetensors")) for k, v in load_file(str(f)).items()}
            want = outs["cpu"]
            plan = plan_merge(recipe_from_dict(recipe), seed=0)
            variants = {f"merge-yaml --device {device}": outs[device]}
            for resident in (True, False):
                merger = InMemoryMerger(plan, device=device, resident=resident)
                where = "resident" if resident else "streamed"
                variants[f"in-memory {where} on {device}"] = merger.merged_state_dict(plan)
            inputs = [loaded[k] for k in ("base", "m1", "m2", "m3")]
            topk = recipe.get("parameters", {}).get("select_topk") if recipe["merge_method"] == "sce" else None
            for label, got in variants.items():
                ok, detail = compare(name, got, want, inputs, topk)
                report("PASS" if ok else "FAIL", f"merge {name} ({label} vs merge-yaml on cpu)", detail)
            del variants
            if device == "cuda":
                torch.cuda.empty_cache()
        except Exception as exc:
            report("FAIL", f"merge {name}", f"{type(exc).__name__}: {exc}")
            traceback.print_exc(file=sys.stderr)


# -- evaluation -----------------------------------------------------------------------------


def task_models(root: Path) -> dict[str, Path]:
    """Random tiny Llamas whose byte-level BPE reads the toy tasks (as tests/conftest.py builds)."""
    from tiny_models import make_tiny_llama, write_bpe_tokenizer

    corpus = []
    for path in sorted((REPO / "eval_tasks" / "data").glob("*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            corpus.extend(str(v) for v in json.loads(line).values())
    out = {}
    for name, seed in (("base", 20), ("spatial", 21), ("arith", 22)):
        path = root / name
        if not (path / "tokenizer.json").exists():  # head_dim 64: attention kernels refuse tiny heads
            make_tiny_llama(path, seed=seed, tokenizer=False, vocab_size=320, hidden_size=128,
                            intermediate_size=344, num_attention_heads=2, num_key_value_heads=2)
            write_bpe_tokenizer(path, 320, corpus)
        out[name] = path
    return out


TASKS = (("toy_arith", "acc,none"), ("toy_spatial", "acc,none"), ("toy_arith_gen", "exact_match,none"))


def _settings(device: str, **extra: object):
    from evolve.evaluation import EvalSettings

    return EvalSettings(limit=40, device=device, dtype="float32", builtin_tasks=False,
                        task_search_paths=(TASK_DIR,), **extra)


def _tasks():
    from evolve.config import TaskConfig

    return [TaskConfig(name=n, metric=m) for n, m in TASKS]


def check_hf(args: argparse.Namespace) -> None:
    device = device_or_skip(args, "hf evaluator cuda == cpu", {"lm_eval": "the HF evaluator"})
    if device is None:
        return
    from evolve.evaluation.hf import HFEvaluator

    models = task_models(args.workdir / "task_models")
    for name in ("base", "arith"):
        try:
            scores = {dev: HFEvaluator(models[name], _settings(dev)).evaluate(_tasks()).scores for dev in ("cpu", device)}
            same = scores["cpu"] == scores[device]
            report("PASS" if same else "FAIL", f"hf evaluator {device} == cpu ({name}, float32)",
                   f"{device} {scores[device]} cpu {scores['cpu']}")
        except Exception as exc:
            report("FAIL", f"hf evaluator ({name})", f"{type(exc).__name__}: {exc}")
            traceback.print_exc(file=sys.stderr)


def check_vllm(args: argparse.Namespace) -> None:
    device = device_or_skip(args, "vllm evaluator == hf evaluator", {"vllm": "the engine", "lm_eval": "scoring"})
    if device is None:
        return
    from evolve.workers.worker import CandidateWorker, WorkerSpec

    models = task_models(args.workdir / "task_models")
    base, spatial, arith = (str(models[k]) for k in ("base", "spatial", "arith"))
    candidates = {  # merged on the merge device, then pushed into the running engine
        "ties": {"merge_method": "ties", "base_model": base, "dtype": "bfloat16", "models": [
            {"model": spatial, "parameters": {"weight": 0.7, "density": 0.5}},
            {"model": arith, "parameters": {"weight": 0.6, "density": 0.6}}]},
        "arith": {"merge_method": "task_arithmetic", "base_model": base, "dtype": "bfloat16", "models": [
            {"model": arith, "parameters": {"weight": 1.0}}]},
    }
    engine = {"gpu_memory_utilization": 0.3, "max_model_len": 512, "enforce_eager": device == "cpu"}
    scores: dict[str, dict[str, dict]] = {}
    try:
        for backend in ("hf", "vllm"):
            settings = _settings(device, backend=backend, vllm=engine if backend == "vllm" else None)
            worker = CandidateWorker(WorkerSpec(template_recipe=candidates["ties"], settings=settings,
                                                train_tasks=_tasks(), merge_device=device))
            for label, recipe in candidates.items():
                result = worker.run(label, recipe, "train")
                if result.status != "ok":
                    raise RuntimeError(f"{backend} {label}: {result.reason}")
                scores.setdefault(label, {})[backend] = result.scores
            worker.evaluator.close()
            del worker
    except Exception as exc:
        report("FAIL", "vllm evaluator == hf evaluator", f"{type(exc).__name__}: {exc}")
        traceback.print_exc(file=sys.stderr)
        return
    for label, by in scores.items():
        report("PASS" if by["vllm"] == by["hf"] else "FAIL",
               f"vllm evaluator == hf evaluator ({label} pushed into the engine, CUDA graphs "
               f"{'off' if device == 'cpu' else 'on'})", f"vllm {by['vllm']} hf {by['hf']}")


def check_bench(args: argparse.Namespace) -> None:
    device = device_or_skip(args, "bench_vllm", {"vllm": "the engine", "lm_eval": "scoring"})
    if device is None:
        return
    zoo = args.workdir / "task_models"
    task_models(zoo)
    argv = [sys.executable, str(REPO / "scripts" / "bench_vllm.py"), "--zoo", str(zoo), "--device", device,
            "--limit", "50", "--repeats", "3"]
    proc = subprocess.run(argv, capture_output=True, text=True, cwd=REPO, timeout=480)
    for line in proc.stdout.splitlines():
        print(f"  {line}", flush=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-4000:])
    report("PASS" if proc.returncode == 0 else "FAIL", f"bench_vllm (--device {device})",
           "numbers above" if proc.returncode == 0 else f"exit {proc.returncode}: {proc.stderr.strip()[-300:]}")


CHECKS = {"env": check_env, "merge": check_merge, "hf": check_hf, "vllm": check_vllm, "bench": check_bench}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("group", choices=sorted(CHECKS))
    parser.add_argument("--workdir", type=Path, required=True, help="scratch folder (models, merges)")
    parser.add_argument("--self-test", action="store_true", help="the GPU side on the CPU (no GPU here)")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    try:
        CHECKS[args.group](args)
    except Exception as exc:  # a check's own bug or a missing package: one FAIL line, not a traceback
        report("FAIL", args.group, f"{type(exc).__name__}: {exc}")
        traceback.print_exc(file=sys.stderr)
    return 1 if FAILED else 0


if __name__ == "__main__":
    sys.exit(main())
