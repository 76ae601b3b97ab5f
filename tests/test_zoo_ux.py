"""What a user of the toy zoo sees: build progress, the tests reusing the README's zoo, the
README's matrix, the pinned instruction sets."""

from __future__ import annotations

import hashlib
import io
import re
from pathlib import Path

from test_zoo import TINY
from zoo_fixture import REPO, zoo_root

import zoo_isa
from toy_zoo import build_zoo, format_matrix
from toy_zoo.settings import stamp_for
from zoo_progress import BuildProgress, format_seconds


def _digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _phases(settings) -> list[tuple[str, int]]:
    return [("base", settings.base_steps)] + [(s, settings.expert_plan(s)[0]) for s in ("spatial", "arith", "format")]


def test_build_prints_steps_loss_and_eta_and_builds_the_same_bytes(tmp_path: Path) -> None:
    out = io.StringIO()
    with BuildProgress(_phases(TINY), every=0.0, out=out) as progress:
        watched = build_zoo(tmp_path / "a", seed=5, settings=TINY, log=progress.log)
    lines = out.getvalue().splitlines()
    for name, steps in _phases(TINY):
        mine = [line for line in lines if line.startswith(f"  {name}: step ")]
        assert len(mine) == steps, lines  # every=0: a line per step
        assert re.fullmatch(rf"  {name}: step {steps}/{steps}, loss \d+\.\d{{3}}, ETA 0 s \(model \d/4; .*\)", mine[-1])
        assert any(line.startswith(f"{name}: {steps} steps") for line in lines)  # the build's own line
    # Watching changes nothing: the bytes (and the cache key, which hashes scripts/toy_zoo only).
    plain = build_zoo(tmp_path / "b", seed=5, settings=TINY, log=lambda _m: None)
    assert _digests(watched.root) == _digests(plain.root)
    assert not (REPO / "scripts" / "toy_zoo" / "zoo_progress.py").exists()
    # The hooks are gone afterwards: a later training prints nothing.
    assert progress._handles == []
    build_zoo(tmp_path / "c", seed=6, settings=TINY, log=lambda _m: None)
    assert out.getvalue().splitlines() == lines


def test_progress_eta_from_the_model_in_training() -> None:
    now = [0.0]
    out = io.StringIO()
    progress = BuildProgress([("base", 10), ("arith", 4)], every=5.0, out=out, clock=lambda: now[0])
    for _ in range(6):  # base: 1 s per step, after a 30 s tokenizer
        now[0] += 30.0 if progress.steps == 0 else 1.0
        progress.on_step()
    assert progress.line().startswith("  base: step 6/10, ETA 4 s (model 1/2; 35 s so far)")
    # A line every 5 s, not one per step: after the tokenizer's 30 s, then 5 steps later.
    assert [line.split(",")[0] for line in out.getvalue().splitlines()] == ["  base: step 1/10", "  base: step 6/10"]
    assert format_seconds(185) == "3 min 05 s"


def test_the_tests_reuse_the_readme_zoo(tmp_path: Path) -> None:
    key = stamp_for(0, TINY)["key"]
    checkout = tmp_path / "zoo"
    assert zoo_root(None, checkout, key) == checkout  # no zoo yet: the tests build the README's
    build_zoo(checkout, seed=0, settings=TINY, log=lambda _m: None)
    assert zoo_root(None, checkout, key) == checkout  # same key: reused, not built again
    assert zoo_root(None, checkout, "other settings") is None  # another zoo: left alone, temp dir
    assert zoo_root(str(tmp_path / "mine"), checkout, key) == tmp_path / "mine"  # TOY_ZOO_DIR wins


def test_readme_matrix_is_the_builds(toy_zoo) -> None:
    """The README shows `scripts/build_zoo.py`'s table of this very zoo (regenerate it from
    zoo/matrix.json with `format_matrix` when the zoo changes)."""
    readme = (REPO / "README.md").read_text()
    assert "```\n" + format_matrix(toy_zoo.matrix) + "\n```" in readme


def test_every_vector_isa_knob_is_pinned() -> None:
    # torch's ATen kernels, MKL's BLAS path and its CPU-dependent blocking (CBWR), and oneDNN
    # (which would pick AVX-512/AMX kernels; the fp32 build runs none of its primitives today).
    assert set(zoo_isa.PINNED) == {"ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS", "MKL_CBWR", "ONEDNN_MAX_CPU_ISA",
                                   "DNNL_MAX_CPU_ISA"}
    assert all(v.lower() == "avx2" for v in zoo_isa.PINNED.values())
