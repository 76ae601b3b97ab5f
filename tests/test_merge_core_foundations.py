"""The small shared modules under the merge engine: errors, dtypes, fsutil, the kernels' layering."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from merge_core.dtypes import DTYPE_ALIASES, RECIPE_DTYPES, canonical_name, safetensors_dtypes, torch_dtype
from merge_core.errors import MethodError, first_line, one_line
from merge_core.fsutil import atomic_write, fsync_dir
from merge_core.kernels.inputs import TensorInputs, TensorParams
from merge_core.methods import get_method


def test_one_line() -> None:
    assert one_line(ValueError("bad\nmore detail")) == "ValueError: bad"
    assert one_line(RuntimeError("\n  \n  second line  \nthird")) == "RuntimeError: second line"
    assert one_line(KeyError("weight_map")) == "KeyError: 'weight_map'"
    assert one_line(RuntimeError()) == "RuntimeError"
    assert first_line("") == "" and first_line("a\nb") == "a"


def test_method_error_is_a_value_error() -> None:
    from merge_core.methods.base import MethodError as ReExported

    assert ReExported is MethodError and issubclass(MethodError, ValueError)
    with pytest.raises(ValueError, match="needs exactly 2 models"):
        get_method("slerp").merge(TensorInputs("w", [torch.zeros(2)] * 3, 0), TensorParams({"t": 0.5}, [{}] * 3))


def test_dtype_names() -> None:
    assert torch_dtype("bfloat16") is torch.bfloat16 and torch_dtype("torch.float16") is torch.float16
    assert torch_dtype(None) is None and torch_dtype("float64") is torch.float64
    with pytest.raises(KeyError):
        torch_dtype("bf16")  # evaluation spellings only when asked for
    assert {name: torch_dtype(name, aliases=True) for name in DTYPE_ALIASES} == {
        "bf16": torch.bfloat16, "fp16": torch.float16, "half": torch.float16,
        "fp32": torch.float32, "float": torch.float32,
    }
    assert all(canonical_name(name) == name for name in RECIPE_DTYPES)
    with pytest.raises(KeyError):
        canonical_name("int8")
    assert safetensors_dtypes()["BF16"] is torch.bfloat16 and safetensors_dtypes()["F32"] is torch.float32


def test_atomic_write_replaces_whole_files_and_cleans_up(tmp_path: Path, monkeypatch) -> None:
    target = tmp_path / "state.json"
    atomic_write(target, b"one")
    atomic_write(target, b"two")
    assert target.read_bytes() == b"two"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]

    def fail(*args: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr("merge_core.fsutil.os.replace", fail)
    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, b"three")
    assert target.read_bytes() == b"two"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]  # the temporary file is gone
    fsync_dir(tmp_path)
    fsync_dir(tmp_path / "missing")  # best effort: no error


def test_light_modules_do_not_import_torch_and_kernels_do_not_import_methods() -> None:
    probe = (
        "import sys\n"
        "import merge_core.dtypes, merge_core.fsutil, merge_core.checkpoint_files, merge_core.model_ref\n"
        "light = 'torch' not in sys.modules\n"
        "import merge_core.kernels.lincomb, merge_core.kernels.sparsify\n"
        "print(light, 'merge_core.methods' in sys.modules, 'torch._dynamo' in sys.modules)\n"
    )
    out = subprocess.check_output([sys.executable, "-c", probe], text=True).split()
    assert out == ["True", "False", "False"]


def test_one_shot_cache_is_cleared_only_by_the_task_arithmetic_family() -> None:
    x = [torch.randn(64) for _ in range(3)]
    ties = TensorInputs("w", x, 0)
    params = TensorParams({}, [{}, {"weight": 1.0, "density": 0.5}, {"weight": 1.0, "density": 0.5}])
    get_method("dare_ties").merge(ties, params, generator=torch.Generator().manual_seed(0))
    assert ties.cache == {}
    slerp = TensorInputs("w", x[:2], 0)
    get_method("slerp").merge(slerp, TensorParams({"t": 0.5}, [{}, {}]))
    assert slerp.cache  # its pair statistics stay, as before
