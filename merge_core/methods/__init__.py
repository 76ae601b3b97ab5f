"""The merge methods, by ``merge_method`` name (mergekit 0.1.5's names, parameters and defaults).

Each method is a class in this package (its parameters and its math at the level of whole
tensors); the tensor kernels they compute with live in :mod:`merge_core.kernels`.
"""

from __future__ import annotations

from merge_core.methods.base import MergeMethod, MethodError
from merge_core.methods.elementwise import ArceeFusion, NearSwap, Ram, RamPlusTL
from merge_core.methods.linear import Linear
from merge_core.methods.model_stock import ModelStock
from merge_core.methods.passthrough import Passthrough
from merge_core.methods.sce import Sce
from merge_core.methods.slerp import NuSlerp, Slerp
from merge_core.methods.spherical import Karcher, MultiSlerp
from merge_core.methods.task_arithmetic import (
    Breadcrumbs,
    BreadcrumbsTies,
    DareLinear,
    DareTies,
    Della,
    DellaLinear,
    TaskArithmetic,
    Ties,
)

__all__ = [
    "METHODS", "ArceeFusion", "Breadcrumbs", "BreadcrumbsTies", "DareLinear", "DareTies", "Della", "DellaLinear",
    "Karcher", "Linear", "MergeMethod", "MethodError", "ModelStock", "MultiSlerp", "NearSwap", "NuSlerp",
    "Passthrough", "Ram", "RamPlusTL", "Sce", "Slerp", "TaskArithmetic", "Ties", "get_method", "method_names",
]

METHODS: dict[str, type] = {
    cls.name: cls
    for cls in (
        Linear,
        Slerp,
        NuSlerp,
        TaskArithmetic,
        Ties,
        DareTies,
        DareLinear,
        Breadcrumbs,
        BreadcrumbsTies,
        Della,
        DellaLinear,
        ModelStock,
        Sce,
        Passthrough,
        MultiSlerp,
        Karcher,
        NearSwap,
        ArceeFusion,
        Ram,
        RamPlusTL,
    )
}


def method_names() -> list[str]:
    """The registered ``merge_method`` names, in registry order."""
    return list(METHODS)


def get_method(name: str) -> MergeMethod:
    """A fresh instance of the method called ``name``; MethodError for unknown names."""
    try:
        cls = METHODS[name]
    except KeyError:
        raise MethodError(f"unknown merge_method '{name}'; known: {', '.join(METHODS)}") from None
    return cls()
