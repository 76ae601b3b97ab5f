"""The streaming I/O behind ``merge-yaml``: declared writer layout, mapped reads, read-ahead,
and the console script's exit path."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from merge_core.errors import ModelError
from merge_core.tensor_io import CheckpointReader
from merge_core.writer import ShardedModelWriter


def _tensors() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    out = {f"layer{i}.w": torch.randn(64, 48, generator=gen).to(torch.bfloat16) for i in range(6)}
    out["f32.bias"] = torch.randn(48, generator=gen)
    out["scalar"] = torch.tensor(3.5)
    out["empty"] = torch.zeros(0, 4, dtype=torch.float16)
    out["mask"] = torch.rand(10, generator=gen) > 0.5
    return out


def _digest(directory: Path) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.iterdir())
        if p.is_file()
    }


@pytest.mark.parametrize("shard_size", [0, 10_000])
def test_declared_layout_writes_the_same_bytes_as_buffering(tmp_path: Path, shard_size: int) -> None:
    tensors = _tensors()
    with ShardedModelWriter(tmp_path / "buffered", shard_size) as writer:
        for name, t in tensors.items():
            writer.add(name, t)
    with ShardedModelWriter(tmp_path / "declared", shard_size) as writer:
        writer.declare((n, t.dtype, t.shape) for n, t in tensors.items())
        for name, t in tensors.items():
            writer.add(name, t)
            assert writer.buffered_bytes <= 64 << 20
    assert _digest(tmp_path / "declared") == _digest(tmp_path / "buffered")
    if shard_size:
        assert len(list((tmp_path / "declared").glob("model-*.safetensors"))) > 1
    loaded: dict[str, torch.Tensor] = {}
    for file in (tmp_path / "declared").glob("*.safetensors"):
        loaded.update(load_file(str(file)))
    assert loaded.keys() == tensors.keys()
    assert all(torch.equal(loaded[n], t) for n, t in tensors.items())


def test_declared_layout_rejects_surprises_and_writes_nothing(tmp_path: Path) -> None:
    out = tmp_path / "out"
    writer = ShardedModelWriter(out, 0)
    writer.declare([("a", torch.float32, (2, 3)), ("b", torch.bfloat16, (4,))])
    with pytest.raises(RuntimeError, match="once, before"):
        writer.declare([("c", torch.float32, (1,))])
    with pytest.raises(ValueError, match="was not declared"):
        writer.add("c", torch.ones(1))
    with pytest.raises(ValueError, match=r"declared torch.float32 \[2, 3\]"):
        writer.add("a", torch.ones(3, 2))
    writer.add("a", torch.ones(2, 3))
    with pytest.raises(ValueError, match="1 declared tensors were never added"):
        writer.finalize()
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_declared_writer_aborted_midway_leaves_no_trace(tmp_path: Path) -> None:
    with pytest.raises(KeyError):
        with ShardedModelWriter(tmp_path / "out", 0) as writer:
            writer.declare([(f"t{i}", torch.float32, (1000,)) for i in range(5)])
            writer.add("t0", torch.ones(1000))
            raise KeyError("merge failed")
    assert list(tmp_path.iterdir()) == []


def test_mapped_reads_equal_copies_and_stay_private(tmp_path: Path) -> None:
    tensors = {n: t for n, t in _tensors().items()}
    save_file(tensors, str(tmp_path / "model.safetensors"))
    before = (tmp_path / "model.safetensors").read_bytes()
    with CheckpointReader(tmp_path) as reader:
        for name, t in tensors.items():
            mapped = reader.get(name, mapped=True)
            assert mapped.dtype == t.dtype and torch.equal(mapped, t)
            assert torch.equal(reader.get(name, dtype=torch.float64, mapped=True), t.double())
        weight = reader.get("layer0.w", mapped=True)
        weight.add_(1.0)  # copy-on-write: neither the file nor later reads see this
        assert torch.equal(reader.get("layer0.w", mapped=True), tensors["layer0.w"])
    assert (tmp_path / "model.safetensors").read_bytes() == before


def test_read_error_in_the_read_ahead_thread_fails_the_merge_cleanly(
    tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    """A checkpoint truncated after its header was validated: one-line error, no output."""
    import shutil

    from merge_core.cli import main as merge_yaml

    broken = tmp_path / "broken"
    shutil.copytree(tiny_models["a"], broken)
    recipe = {
        "merge_method": "linear",
        "models": [{"model": str(tiny_models["base"]), "parameters": {"weight": 0.5}},
                   {"model": str(broken), "parameters": {"weight": 0.5}}],
    }
    path = tmp_path / "recipe.yml"
    path.write_text(yaml.safe_dump(recipe))
    import merge_core.tensor_io as tio

    real = tio._parse_header_and_start

    def shrink_after_parse(file):  # validate the intact file, then cut its data short
        result = real(file)
        if Path(file).parent == broken:
            with open(file, "r+b") as fh:
                fh.truncate(result[1] + 16)
        return result

    tio._parse_header_and_start = shrink_after_parse
    try:
        code = merge_yaml([str(path), str(tmp_path / "out"), "--quiet"])
    finally:
        tio._parse_header_and_start = real
    assert code == 2
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_console_script_reports_and_exits(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    recipe = {
        "merge_method": "linear",
        "models": [{"model": str(tiny_models["base"]), "parameters": {"weight": 0.5}},
                   {"model": str(tiny_models["a"]), "parameters": {"weight": 0.5}}],
    }
    path = tmp_path / "recipe.yml"
    path.write_text(yaml.safe_dump(recipe))
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    ok = subprocess.run([sys.executable, "-m", "merge_core.cli", str(path), str(tmp_path / "m")],
                        capture_output=True, text=True, env=env)
    assert ok.returncode == 0, ok.stderr
    assert f"merged model written to {tmp_path / 'm'}" in ok.stdout
    assert (tmp_path / "m" / "model.safetensors").is_file()
    bad = subprocess.run([sys.executable, "-m", "merge_core.cli", str(tmp_path / "nope.yml"),
                          str(tmp_path / "n")], capture_output=True, text=True, env=env)
    assert bad.returncode == 2
    assert bad.stderr.startswith("merge-yaml: error:") and len(bad.stderr.splitlines()) == 1


def test_missing_tensor_data_is_a_model_error(tmp_path: Path) -> None:
    save_file({"w": torch.ones(4096)}, str(tmp_path / "model.safetensors"))
    reader = CheckpointReader(tmp_path)
    with open(tmp_path / "model.safetensors", "r+b") as fh:
        fh.truncate(100)
    with pytest.raises(ModelError, match="cannot read 'w'"):
        reader.get("w")
    reader.close()
