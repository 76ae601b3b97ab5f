"""Micro benchmark of the merge methods alone (no I/O): one-shot, first (cache build) and warm calls.

    python scripts/bench_methods.py [--params 20M] [--threads 2] [--methods ties,della]

Builds bf16-like inputs (a base and two 'fine-tunes' = base + 0.01 * noise, rounded to bf16, held
in float32 like the in-memory merger holds them) shaped as Llama MLP/attention matrices, then
times per method: ``oneshot`` (``TensorInputs.reuse`` False, as merge-yaml), ``first`` (a fresh
reusable input: cache build + merge) and ``warm`` (best of 3 later calls with other densities /
weights; the methods without such parameters: other global values, see GLOBALS), all into a
preallocated output.  nearswap and arcee_fusion merge the base and one fine-tune.  ``ratio`` is the warm effective traffic (inputs read
once + output written once) over a preallocated torch copy's bandwidth.
"""

from __future__ import annotations

import argparse
import time

import torch

from merge_core.kernels.inputs import TensorInputs, TensorParams
from merge_core.methods import get_method

SHAPES = [(4864, 1024), (1024, 4864), (1024, 1024), (512, 1024), (1024,)]


def make_tensors(total: float, seed: int = 0) -> list[list[torch.Tensor]]:
    """Per tensor name: [base, ft1, ft2] (float32 holding bf16 values), about ``total`` elements each."""
    gen = torch.Generator().manual_seed(seed)
    groups, count, k = [], 0, 0
    while count < total:
        shape = SHAPES[k % len(SHAPES)]
        k += 1
        base = (0.02 * torch.randn(shape, generator=gen)).bfloat16()
        fts = [(base.float() + 0.01 * torch.randn(shape, generator=gen)).bfloat16() for _ in range(2)]
        groups.append([base.float(), *(t.float() for t in fts)])
        count += base.numel()
    return groups


# Global parameter values per variant, for the methods that take some (others: defaults).
GLOBALS = {
    "nearswap": lambda v: {"t": [1e-3, 5e-3, 2e-3, 1e-2][v % 4]},
    "ram": lambda v: {"epsilon": [1e-5, 1e-3, 3e-3, 5e-3][v % 4]},
    "ramplus_tl": lambda v: {"r": 0.1 + 0.2 * (v % 4), "alpha": 0.2 + 0.1 * (v % 4)},
    "karcher": lambda v: {"max_iter": 10 + v % 4},
    "sce": lambda v: {"select_topk": [1.0, 0.5, 0.3, 0.8][v % 4]},
}


def n_inputs(method: str) -> int:
    """Tensors per merge: base + two fine-tunes, or base + one for the two-model methods."""
    return 2 if get_method(method).max_inputs == 2 else 3


def params_for(method: str, variant: int) -> TensorParams:
    impl = get_method(method)
    names = {s.name for s in impl.model_params}
    dens = [[0.3, 0.5], [0.7, 0.4], [0.5, 0.6], [0.2, 0.8]][variant % 4]
    w = [[0.6, 0.4], [0.9, 0.2], [0.3, 0.5], [0.5, 0.5]][variant % 4]
    per = [{}]
    for j in range(n_inputs(method) - 1):
        p = {}
        if "weight" in names:
            p["weight"] = w[j]
        if "density" in names:
            p["density"] = dens[j]
        if method.startswith("della"):
            p["epsilon"] = 0.1
        per.append(p)
    if method == "linear":
        per[0] = {"weight": 0.2}
    return TensorParams(GLOBALS.get(method, lambda v: {})(variant), per)


def run(method_name: str, groups, inputs_list, outs, variant: int) -> float:
    method = get_method(method_name)
    base = None if method.base_rule == "ignored" else 0
    start = time.perf_counter()
    n = n_inputs(method_name)
    for k, tensors in enumerate(groups):
        inputs = inputs_list[k] if inputs_list is not None else TensorInputs(str(k), tensors[:n], base)
        gen = torch.Generator().manual_seed(k) if method.randomized else None
        method.merge(inputs, params_for(method_name, variant), out=outs[k], generator=gen)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="20M")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--methods", default="linear,task_arithmetic,ties,dare_ties,della,breadcrumbs,multislerp,"
                                             "karcher,nearswap,arcee_fusion,ram,ramplus_tl")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    total = float(args.params.rstrip("M")) * 1e6
    groups = make_tensors(total)
    outs = [torch.empty_like(g[0]) for g in groups]
    n = sum(o.numel() for o in outs)
    srcs = [g[1] for g in groups]
    copy = min(_timeit(lambda: [o.copy_(s) for o, s in zip(outs, srcs)]) for _ in range(5))
    bw = 2 * 4 * n / copy
    print(f"{n / 1e6:.0f}M elements per model, copy {bw / 1e9:.1f} GB/s, {args.threads} threads")
    print(f"{'method':<18}{'oneshot s':>10}{'first s':>9}{'warm s':>9}{'ratio':>7}")
    for name in args.methods.split(","):
        method = get_method(name)
        base = None if method.base_rule == "ignored" else 0
        oneshot = run(name, groups, None, outs, 0)
        reusable = [TensorInputs(str(k), g[:n_inputs(name)], base, reuse=True) for k, g in enumerate(groups)]
        first = run(name, groups, reusable, outs, 0)
        warm = min(run(name, groups, reusable, outs, v) for v in (1, 2, 3))
        traffic = (n_inputs(name) + 1) * n * 4  # the inputs read once + the output written once, float32
        print(f"{name:<18}{oneshot:>10.2f}{first:>9.2f}{warm:>9.2f}{traffic / warm / bw:>7.2f}", flush=True)
        del reusable


def _timeit(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


if __name__ == "__main__":
    main()
