"""The C helpers (merge_core.kernels.native) give exactly the PyTorch path's numbers."""

from __future__ import annotations

import math
import shutil

import pytest
import torch

from merge_core.kernels import native
from merge_core.kernels.della import DellaLookup

needs_compiler = pytest.mark.skipif(
    not any(shutil.which(c) for c in ("cc", "gcc", "clang")), reason="no C compiler on this machine")


def _lookup(rows: int, length: int, seed: int, draw_range: int = 65536) -> DellaLookup:
    gen = torch.Generator().manual_seed(seed)
    mags = torch.rand(rows, length, generator=gen)
    ranks = torch.argsort(torch.argsort(mags, 1), 1).float() / (length - 1)
    low = -32768 + (65536 - draw_range) // 2
    draws = torch.randint(low, low + draw_range, (rows, length), generator=gen).to(torch.int16)
    return DellaLookup(ranks, mags, draws)


def _torch_kept(lookup: DellaLookup, a: float, b: float, monkeypatch) -> float:
    with monkeypatch.context() as m:
        m.setenv("MERGE_CORE_NATIVE", "0")
        return lookup.kept(a, b)


@needs_compiler
@pytest.mark.parametrize("rows,length,draw_range", [
    (1, 5, 65536), (31, 2, 65536), (32, 7, 65536), (33, 40, 65536), (64, 96, 65536),
    (1000, 3, 65536), (257, 96, 64),  # many equal draws: the count must take every tie
])
def test_della_kept_in_c_equals_pytorch(rows, length, draw_range, monkeypatch):
    """Row counts around the fence block size (32), tiny and long rank groups, thresholds from
    nothing kept to everything kept: the C lookup returns the PyTorch lookup's sum."""
    monkeypatch.setenv("MERGE_CORE_NATIVE", "1")
    assert native.library() is not None, "the C helpers did not build"
    lookup = _lookup(rows, length, seed=rows * 7 + length, draw_range=draw_range)
    gen = torch.Generator().manual_seed(1)
    cases = [(0.5, 0.0), (1e-6, 0.0), (0.999999, 0.0), (0.5, 0.4999), (0.02, 0.0199)]
    cases += [(float(d), float(e) * min(float(d), 1 - float(d)))
              for d, e in torch.rand(200, 2, generator=gen).tolist()]
    for density, epsilon in cases:
        a, b = math.ceil((density - epsilon) * 65536 - 32768) - 1, 2 * epsilon * 65536
        expected = _torch_kept(lookup, a, b, monkeypatch)
        got = lookup.kept(a, b)
        assert got == pytest.approx(expected, rel=1e-12, abs=1e-9), (density, epsilon)
    everything = lookup.kept(32766, 0.0)
    assert 0.99 * lookup.total < everything <= lookup.total * (1 + 1e-6)


def test_disabled_or_unbuildable_helpers_fall_back(monkeypatch, tmp_path):
    """MERGE_CORE_NATIVE=0 turns the helpers off; without a compiler they are None (one warning)
    and the lookup still answers through PyTorch."""
    lookup = _lookup(40, 9, seed=3)
    a, b = -13108, 0.2 * 65536
    monkeypatch.setenv("MERGE_CORE_NATIVE", "0")
    assert native.library() is None
    expected = lookup.kept(a, b)
    monkeypatch.setenv("MERGE_CORE_NATIVE", "1")
    monkeypatch.setattr(native, "_state", {})
    monkeypatch.setenv("MERGE_CORE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(native, "_compiler", lambda: None)
    assert native.library() is None
    assert lookup.kept(a, b) == expected


@needs_compiler
def test_build_is_cached_on_disk(monkeypatch, tmp_path):
    """A fresh process loads the compiled library from the cache directory instead of compiling."""
    monkeypatch.setenv("MERGE_CORE_NATIVE", "1")
    monkeypatch.setenv("MERGE_CORE_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(native, "_state", {})
    assert native.library() is not None
    built = list(tmp_path.glob("native-*.so"))
    assert len(built) == 1
    monkeypatch.setattr(native, "_state", {})
    monkeypatch.setattr(native, "_compiler", lambda: None)  # compiling again would fail
    assert native.library() is not None
