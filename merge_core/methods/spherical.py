"""``multislerp`` and ``karcher``: weighted means of whole tensors on the hypersphere.

Both treat each (task) vector as a direction and a length: the directions are averaged on the
unit sphere, the lengths linearly, and the result is the averaged direction times the averaged
length.  Every intermediate point of their geometry (the Euclidean mean of the unit vectors,
tangent vectors, the exponential map back onto the sphere) is a linear combination of the
inputs, so the methods run on the inputs' Gram matrix (:func:`~merge_core.kernels.gram.gram`,
float64, cached) and write the result as one chunked linear combination: one read of each
input per merge, whatever the number of Karcher iterations.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch

from merge_core.kernels.gram import gram
from merge_core.kernels.lincomb import lincomb
from merge_core.methods.base import MethodBase, MethodError, ParamSpec, TensorInputs, Values


def _norm(coef: torch.Tensor, g: torch.Tensor) -> float:
    """Length of ``sum_k coef_k v_k`` for vectors with Gram matrix ``g``."""
    return math.sqrt(max(float(coef @ g @ coef), 0.0))


def _with_base(inputs: TensorInputs, models: list[int], coef: torch.Tensor,
               out: torch.Tensor | None) -> torch.Tensor:
    """``sum_k coef_k v_k`` (plus the base when ``v_k`` are task vectors) as one lincomb."""
    terms = [(i, float(c)) for i, c in zip(models, coef)]
    base = inputs.base_index
    if base is not None:
        terms.append((base, 1.0 - float(coef.sum())))
    return lincomb(inputs, terms, out)


class MultiSlerp(MethodBase):
    """mergekit ``multislerp``: barycentric interpolation of any number of models on a hypersphere.

    The (task) vectors ``v_k`` (``x_k - base`` with a base model, else ``x_k``; the whole tensor
    is one vector) are projected onto the unit sphere (``u_k = v_k / (|v_k| + eps)``); their
    ``weight``-ed mean ``m`` gives the tangent point ``m / |m|``; the weighted mean of the
    tangent vectors is mapped back with the exponential map and scaled by the weighted mean of
    the norms ``|v_k|``.  ``normalize_weights`` (default) divides the weights by their sum.

    One model besides the base is returned unchanged.  When ``|m| < eps`` (antipodal vectors
    whose weights cancel) two models are interpolated linearly (``w0 v0 + w1 v1``) and more are
    refused, as in mergekit; weights summing to 0 with ``normalize_weights`` are refused (mergekit
    would divide by zero).
    """

    name: ClassVar[str] = "multislerp"
    base_rule = "optional"
    global_params = (
        ParamSpec("normalize_weights", True, kind="bool"),
        ParamSpec("eps", 1e-8),
    )
    model_params = (ParamSpec("weight", required=True),)
    min_non_base = 1

    def _merge(self, inputs: TensorInputs, glob: Values, per_model: list[Values],
               out: torch.Tensor | None, generator: torch.Generator | None) -> torch.Tensor:
        models = inputs.others
        if len(models) == 1:
            return lincomb(inputs, [(models[0], 1.0)], out)
        eps = float(glob["eps"])
        w = torch.tensor([float(per_model[i]["weight"]) for i in models], dtype=torch.float64)
        if glob["normalize_weights"]:
            total = float(w.sum())
            if total == 0.0:
                raise MethodError(f"multislerp: weights sum to 0 for {inputs.name}, cannot normalize_weights")
            w = w / total
        g = gram(inputs, models, inputs.base_index)
        norms = g.diagonal().clamp(min=0).sqrt()
        # Coefficients on the v_k: u_k = e_k / (|v_k| + eps), the weighted mean m = sum w_k u_k.
        to_unit = 1.0 / (norms + eps)
        mean = w * to_unit
        mean_norm = _norm(mean, g)
        if mean_norm < eps:
            if len(models) == 2:
                return _with_base(inputs, models, w, out)
            raise MethodError(
                f"multislerp: the weighted mean of the unit vectors of {inputs.name} is zero (antipodal "
                "models whose weights cancel); use other weights"
            )
        point = mean / mean_norm
        # Tangent vectors at the point: u_k - (u_k . point) point; their weighted mean, mapped back
        # onto the sphere.  (In exact arithmetic this mean is 0 and the map returns the point.)
        dots = (g @ point) * to_unit
        tangent = mean - float(w @ dots) * point
        length = _norm(tangent, g) + eps
        direction = math.cos(length) * point + (math.sin(length) / length) * tangent
        return _with_base(inputs, models, direction * float(norms @ w), out)


class Karcher(MethodBase):
    """mergekit ``karcher``: the Karcher (Riemannian) mean of the models on the unit sphere.

    Every model (a ``base_model`` is merged as one more model) gets the same weight ``1/N``.
    The directions ``x_k / |x_k|`` of the models longer than ``tol`` are averaged by Riemannian
    gradient descent: start at their normalized Euclidean mean (the first direction when that
    is shorter than ``tol``), move along the weighted mean of the log maps for at most
    ``max_iter`` steps, stopping once that tangent is shorter than ``tol`` (directions within
    ``tol`` radians of the mean contribute nothing).  The result is that direction times
    ``sum_k |x_k| / N``; all models shorter than ``tol`` give zeros, one model is returned as is.
    """

    name: ClassVar[str] = "karcher"
    base_rule = "ignored"
    global_params = (
        ParamSpec("max_iter", 10, kind="int", minimum=0),
        ParamSpec("tol", 1e-5),
    )

    def _merge(self, inputs: TensorInputs, glob: Values, per_model: list[Values],
               out: torch.Tensor | None, generator: torch.Generator | None) -> torch.Tensor:
        n = len(inputs.tensors)
        if n == 1:
            return lincomb(inputs, [(0, 1.0)], out)
        tol = float(glob["tol"])
        g = gram(inputs, list(range(n)), None)
        norms = g.diagonal().clamp(min=0).sqrt()
        valid = [k for k in range(n) if float(norms[k]) > tol]
        if not valid:
            return lincomb(inputs, [], out)
        nv = norms[valid]
        h = g[valid][:, valid] / torch.outer(nv, nv)  # Gram matrix of the unit directions
        alpha = torch.full((len(valid),), 1.0 / len(valid), dtype=torch.float64)
        mean = alpha.clone()
        length = _norm(mean, h)
        if length < tol:
            mean = torch.zeros_like(alpha)
            mean[0] = 1.0
        else:
            mean /= length
        eye = torch.eye(len(valid), dtype=torch.float64)
        for _ in range(int(glob["max_iter"])):
            dots = (h @ mean).clamp(-1.0, 1.0)
            tangent = torch.zeros_like(mean)
            for j in range(len(valid)):
                theta = math.acos(float(dots[j]))
                if theta < tol:
                    continue
                tangent += float(alpha[j]) * (theta / math.sin(theta)) * (eye[j] - dots[j] * mean)
            step = _norm(tangent, h)
            if step < tol:
                break
            mean = math.cos(step) * mean + (math.sin(step) / step) * tangent
            length = _norm(mean, h)
            if length > tol:
                mean /= length
        scale = float(norms.sum()) / n
        coef = [0.0] * n
        for j, k in enumerate(valid):
            coef[k] = scale * float(mean[j]) / float(norms[k])
        return lincomb(inputs, list(enumerate(coef)), out)
