"""Element-wise merges against a base: ``nearswap``, ``ram``, ``ramplus_tl`` and ``arcee_fusion``.

``nearswap``, ``ram`` and ``ramplus_tl`` are per-element formulas and run chunk by chunk (one
read of every input, one write of the output; ``ramplus_tl`` first counts, per model, the
elements it shares and the elements only it changes).  ``arcee_fusion`` needs whole rows
(a softmax per row) and quantiles of the whole tensor: it works on blocks of rows, keeping
the whole tensor's importances.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from merge_core.kernels import fused
from merge_core.kernels.caches import cached_for_seed
from merge_core.kernels.chunking import Target, chunk_len, chunks, flat
from merge_core.methods.base import MethodBase, ParamSpec, TensorInputs, Values


def _chunk(inputs: TensorInputs, i: int, start: int, stop: int) -> torch.Tensor:
    """Model ``i``'s elements ``[start, stop)`` in the compute dtype."""
    return flat(inputs.tensors[i])[start:stop].to(inputs.compute_dtype)


class NearSwap(MethodBase):
    """mergekit ``nearswap``: take the other model where it is near the base, keep the base elsewhere.

    Per element, with ``a`` the base and ``b`` the one other model,
    ``w = clamp(t / max(|a - b|, 1e-6), 0, 1)`` and the result is ``w b + (1 - w) a``: elements
    that differ by at most ``t`` become ``b``, larger differences move ``b``'s way by ``t``'s share
    (a ``t <= 0`` keeps the base).  Exactly one model besides the base.
    """

    name: ClassVar[str] = "nearswap"
    base_rule = "required"
    global_params = (ParamSpec("t", required=True),)
    min_inputs = 2
    max_inputs = 2

    def _merge(self, inputs: TensorInputs, glob: Values, per_model: list[Values],
               out: torch.Tensor | None, generator: torch.Generator | None) -> torch.Tensor:
        t = float(glob["t"])
        base, other = inputs.base_index, inputs.others[0]
        if fused.usable(inputs, out, needs_out=True) and fused.nearswap(inputs, base, other, t, out):
            return out
        target = Target(inputs, out)
        for start, stop in chunks(target.flat_out.numel(), target.flat_out.device):
            a, b = _chunk(inputs, base, start, stop), _chunk(inputs, other, start, stop)
            w = torch.sub(a, b).abs_().clamp_(min=1e-6)
            w = (t / w).clamp_(0.0, 1.0)
            result = torch.mul(w, b).add_(w.neg_().add_(1.0).mul_(a))
            target.flat_out[start:stop].copy_(result)
        return target.finish()


class Ram(MethodBase):
    """mergekit ``ram`` (Reinforced Agent Merging): keep what one model alone changes, average
    what several change.

    A model changes an element when its task vector there exceeds ``epsilon`` in magnitude.
    Per element the result is the base plus: the one changing model's task vector, the mean
    of the changing models' task vectors where several change it, nothing where none does.
    No parameters per model; the base alone is returned as is.
    """

    name: ClassVar[str] = "ram"
    base_rule = "required"
    global_params: ClassVar[tuple[ParamSpec, ...]] = (ParamSpec("epsilon", 1e-5),)

    def _scales(self, inputs: TensorInputs, glob: Values) -> list[float] | None:
        """Per-model factors on the elements only that model changes (None: all 1)."""
        return None

    def _merge(self, inputs: TensorInputs, glob: Values, per_model: list[Values],
               out: torch.Tensor | None, generator: torch.Generator | None) -> torch.Tensor:
        eps = float(glob["epsilon"])
        scales = self._scales(inputs, glob)
        models = inputs.others
        if models and fused.usable(inputs, out, needs_out=True) and fused.ram(
                inputs, models, eps, scales or [1.0] * len(models), out):
            return out
        lam = None if scales is None else torch.tensor(scales, dtype=torch.float32).to(inputs.compute_dtype)
        target = Target(inputs, out)
        for start, stop in chunks(target.flat_out.numel(), target.flat_out.device):
            b = _chunk(inputs, inputs.base_index, start, stop)
            if not models:
                target.flat_out[start:stop].copy_(b)
                continue
            tv = torch.stack([_chunk(inputs, i, start, stop) - b for i in models])
            changed = tv.abs() > eps
            count = changed.sum(dim=0)
            tv.mul_(changed)
            terms = tv / count.clamp(min=1)  # the one changing model's value where count is 1
            if lam is not None:
                alone = (count == 1) & changed
                terms = torch.where(alone, tv * lam.view(-1, 1).to(tv.device), terms)
            target.flat_out[start:stop].copy_(b + terms.sum(dim=0))  # b may be the input itself
        return target.finish()


class RamPlusTL(Ram):
    """mergekit ``ramplus_tl`` (RAM+, tensor-local): RAM with each model's unique changes scaled up.

    For model ``i`` in this tensor, ``rho_i`` is the number of elements it changes together with
    another model over the number only it changes (``max(count, epsilon)`` below), and the
    elements only it changes are multiplied by ``1 + r * clamp(rho_i, 0, alpha)``.
    """

    name: ClassVar[str] = "ramplus_tl"
    global_params = (
        ParamSpec("r", 0.1),
        ParamSpec("alpha", 0.2),
        ParamSpec("epsilon", 1e-5),
    )

    def _scales(self, inputs: TensorInputs, glob: Values) -> list[float] | None:
        models = inputs.others
        if not models:
            return None
        eps = float(glob["epsilon"])
        # The counts depend on the tensors and epsilon only: kept while epsilon stays the same.
        shared, alone = cached_for_seed(inputs, "ramplus_counts", eps, lambda: _counts(inputs, models, eps))
        # Counts divide as float32, as mergekit's tensors do (exact below 2**24 elements).
        rho = shared / alone.clamp(min=eps)
        lam = 1 + float(glob["r"]) * rho.clamp(min=0, max=float(glob["alpha"]))
        return [float(v) for v in lam]


def _counts(inputs: TensorInputs, models: list[int], eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per model: how many elements it changes together with another model, and alone."""
    shared = torch.zeros(len(models), dtype=torch.int64)
    alone = torch.zeros(len(models), dtype=torch.int64)
    ref = inputs.tensors[0]
    for start, stop in chunks(ref.numel(), ref.device):
        b = _chunk(inputs, inputs.base_index, start, stop)
        changed = torch.stack([(_chunk(inputs, i, start, stop) - b).abs() > eps for i in models])
        several = changed.sum(dim=0) > 1
        shared += (changed & several).sum(dim=1).cpu()
        alone += (changed & ~several).sum(dim=1).cpu()
    return shared, alone


class ArceeFusion(MethodBase):
    """mergekit ``arcee_fusion``: take the other model's changes only where they matter most.

    Importance of an element: ``|x - base|`` times the KL divergence ``KL(p || q)`` of its row,
    with ``p``, ``q`` the softmax (plus 1e-8) of the row in the model and in the base (the
    last dimension; a 1-D tensor is one row).  The threshold is ``median + 1.5 IQR`` of the
    importances (quantiles at ``floor(q (n - 1))`` of the sorted values); elements at or above
    it take the model's value, the others keep the base.  Exactly one model besides the base,
    no parameters.  mergekit estimates the quantiles of tensors above a million elements from a
    random sample (drawn from the global RNG, so not reproducible); here they are always exact.
    """

    name: ClassVar[str] = "arcee_fusion"
    base_rule = "required"
    min_inputs = 2
    max_inputs = 2

    def _merge(self, inputs: TensorInputs, glob: Values, per_model: list[Values],
               out: torch.Tensor | None, generator: torch.Generator | None) -> torch.Tensor:
        # Rows in blocks of about a million elements: the softmax temporaries stay small, only
        # the importances (needed whole for their quantiles) take full-size memory, and the
        # number of (multi-threaded) torch calls stays low.
        x, z = inputs.tensors[inputs.others[0]], inputs.base
        cols = x.shape[-1] if x.dim() else 1
        rows = x.reshape(-1, cols), z.reshape(-1, cols)
        step = max(1, 8 * chunk_len(x.device) // cols)
        importance = torch.empty(rows[0].shape, dtype=inputs.compute_dtype, device=x.device)
        for start in range(0, rows[0].shape[0], step):
            block_x, block_z = self._block(inputs, rows, start, step)
            importance[start:start + step] = _importance(block_x, block_z)
        q1, median, q3 = _quantiles(importance.view(-1), (0.25, 0.5, 0.75))
        threshold = median + 1.5 * (q3 - q1)
        target = Target(inputs, out)
        result = target.result.view(-1, cols)
        for start in range(0, rows[0].shape[0], step):
            block_x, block_z = self._block(inputs, rows, start, step)
            keep = importance[start:start + step] >= threshold
            result[start:start + step].copy_(block_z + (block_x - block_z) * keep)
        return target.finish()

    @staticmethod
    def _block(inputs: TensorInputs, rows: tuple[torch.Tensor, torch.Tensor], start: int,
               step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows ``[start, start + step)`` of the model and the base, in the compute dtype."""
        return tuple(r[start:start + step].to(inputs.compute_dtype) for r in rows)


def _importance(x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """``|x - z|`` times each row's ``KL(softmax(x) + 1e-8 || softmax(z) + 1e-8)``."""
    p = torch.softmax(x, dim=-1) + 1e-8
    q = torch.softmax(z, dim=-1) + 1e-8
    return (x - z).abs() * torch.sum(p * torch.log(p / q), dim=-1, keepdim=True)


def _quantiles(values: torch.Tensor, fractions: tuple[float, ...]) -> list[torch.Tensor]:
    """The sorted ``values`` at positions ``floor(f * (n - 1))`` (no interpolation)."""
    n = values.numel()
    positions = [int(f * (n - 1)) for f in fractions]
    if values.device.type == "cpu":  # a partial sort (numpy's introselect): ~10x faster than a sort
        import numpy as np

        picked = np.partition(values.numpy(), positions)[positions]
        return [torch.tensor(v, dtype=values.dtype) for v in picked]
    ordered = torch.sort(values).values
    return [ordered[k] for k in positions]
