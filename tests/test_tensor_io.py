"""CheckpointReader / read_header / load_config on real tiny checkpoints and damaged files."""

from __future__ import annotations

import gc
import json
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from merge_core.errors import ModelError
from merge_core.tensor_io import CheckpointReader, load_config, read_header


def _all_tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for file in sorted(model_dir.glob("*.safetensors")):
        out.update(load_file(str(file)))
    return out


def _one_line_error(excinfo: pytest.ExceptionInfo[ModelError], *needles: str) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message, message
    return message


@pytest.mark.parametrize("which", ["a", "b"])  # b is sharded with an index
def test_reads_every_tensor_exactly(tiny_models: dict[str, Path], which: str) -> None:
    expected = _all_tensors(tiny_models[which])
    with CheckpointReader(tiny_models[which]) as reader:
        assert sorted(reader.names()) == sorted(expected)
        for name, tensor in expected.items():
            assert reader.shape(name) == tuple(tensor.shape)
            assert reader.dtype(name) == tensor.dtype
            assert reader.nbytes(name) == tensor.numel() * tensor.element_size()
            assert name in reader
            got = reader.get(name)
            assert got.dtype == tensor.dtype and torch.equal(got, tensor)
        assert reader.total_bytes() == sum(t.numel() * t.element_size() for t in expected.values())
    assert "nope" not in reader


def test_sharded_names_follow_index_order(tiny_models: dict[str, Path]) -> None:
    index = json.loads((tiny_models["b"] / "model.safetensors.index.json").read_text())
    with CheckpointReader(tiny_models["b"]) as reader:
        assert reader.names() == list(index["weight_map"])
        assert {p.name for p in reader.files()} == set(index["weight_map"].values())


def test_get_casts_dtype_and_result_is_private(tiny_models: dict[str, Path]) -> None:
    name = "model.layers.0.mlp.up_proj.weight"
    with CheckpointReader(tiny_models["a"]) as reader:
        original = reader.get(name)
        half = reader.get(name, dtype=torch.bfloat16)
        assert half.dtype == torch.bfloat16
        assert torch.equal(half, original.to(torch.bfloat16))
        half.add_(1.0)  # modifying a result must not change the file or later reads
        assert torch.equal(reader.get(name), original)
        with pytest.raises(ModelError, match="no tensor named 'missing'"):
            reader.get("missing")
    assert torch.equal(load_file(str(tiny_models["a"] / "model.safetensors"))[name], original)


def test_close_then_reuse(tiny_models: dict[str, Path]) -> None:
    reader = CheckpointReader(tiny_models["b"])
    first = reader.get("model.norm.weight")
    reader.close()
    assert torch.equal(reader.get("model.norm.weight"), first)
    reader.close()


def test_read_header_matches_safetensors(tiny_models: dict[str, Path]) -> None:
    file = tiny_models["a"] / "model.safetensors"
    header = read_header(file)
    with safe_open(str(file), framework="pt") as fh:
        assert set(header) == set(fh.keys())
        for name in fh.keys():
            sl = fh.get_slice(name)
            assert header[name] == (fh.get_tensor(name).dtype, tuple(sl.get_shape()))


def _header_len(file: Path) -> int:
    return struct.unpack("<Q", file.read_bytes()[:8])[0]


def _rewrite_header(file: Path, header: dict) -> None:
    raw = file.read_bytes()
    data = raw[8 + _header_len(file) :]
    new = json.dumps(header).encode()
    file.write_bytes(struct.pack("<Q", len(new)) + new + data)


@pytest.fixture
def damaged(tmp_path: Path, tiny_models: dict[str, Path]) -> Path:
    """A writable copy of tiny model ``b`` (sharded) to damage."""
    dst = tmp_path / "damaged"
    shutil.copytree(tiny_models["b"], dst)
    return dst


def test_truncated_shard_fails_at_open(damaged: Path) -> None:
    shard = damaged / "model-00002-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(ModelError) as excinfo:
        CheckpointReader(damaged)  # before any get(): corrupt files are caught up front
    _one_line_error(excinfo, str(shard), "corrupt safetensors header", "beyond the end of the file")


@pytest.mark.parametrize(
    "damage, needle",
    [
        (lambda f: f.write_bytes(b"\x01\x02"), "shorter than the 8-byte length field"),
        (lambda f: f.write_bytes(struct.pack("<Q", 10**6) + b"{}"), "exceeds the file size"),
        (lambda f: f.write_bytes(struct.pack("<Q", 5) + b"{oops"), "not valid JSON"),
        (lambda f: f.write_bytes(struct.pack("<Q", 2) + b"[]"), "not a JSON object"),
    ],
)
def test_read_header_rejects_malformed_files(tmp_path: Path, damage, needle: str) -> None:
    file = tmp_path / "model.safetensors"
    damage(file)
    with pytest.raises(ModelError) as excinfo:
        read_header(file)
    _one_line_error(excinfo, str(file), "corrupt safetensors header", needle)


@pytest.mark.parametrize(
    "edit, needle",
    [
        (lambda h, n: h[n].update(dtype="F13"), "unknown dtype 'F13'"),
        (lambda h, n: h[n].update(shape=[3, -1]), "bad shape"),
        (lambda h, n: h[n].update(shape=[7]), "its shape needs"),
        (lambda h, n: h[n].update(data_offsets=[5, 1]), "bad data_offsets"),
    ],
)
def test_read_header_rejects_bad_entries(
    tmp_path: Path, tiny_models: dict[str, Path], edit, needle: str
) -> None:
    file = tmp_path / "model.safetensors"
    shutil.copy(tiny_models["a"] / "model.safetensors", file)
    header = json.loads(file.read_bytes()[8 : 8 + _header_len(file)])
    edit(header, "model.norm.weight")
    _rewrite_header(file, header)
    with pytest.raises(ModelError) as excinfo:
        CheckpointReader(tmp_path)
    _one_line_error(excinfo, str(file), "corrupt safetensors header", needle, "model.norm.weight")


def test_overlapping_data_is_rejected(tmp_path: Path) -> None:
    file = tmp_path / "x.safetensors"
    save_file({"a": torch.zeros(4), "b": torch.ones(4)}, str(file))
    header = json.loads(file.read_bytes()[8 : 8 + _header_len(file)])
    header["b"]["data_offsets"] = [8, 24]
    header["a"]["data_offsets"] = [0, 16]
    _rewrite_header(file, header)
    with pytest.raises(ModelError, match="overlaps"):
        read_header(file)


def test_pickle_only_checkpoint_is_refused(tmp_path: Path) -> None:
    torch.save({"w": torch.zeros(2)}, tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelError) as excinfo:
        CheckpointReader(tmp_path)
    _one_line_error(excinfo, str(tmp_path), "pytorch_model.bin", "pickle", "safetensors")


def test_safetensors_preferred_over_pickle(tmp_path: Path, tiny_models: dict[str, Path]) -> None:
    shutil.copytree(tiny_models["a"], tmp_path / "m")
    torch.save({"w": torch.zeros(2)}, tmp_path / "m" / "pytorch_model.bin")
    with CheckpointReader(tmp_path / "m") as reader:
        assert "lm_head.weight" in reader.names()


def test_missing_and_empty_directories(tmp_path: Path) -> None:
    with pytest.raises(ModelError) as excinfo:
        CheckpointReader(tmp_path / "nowhere")
    _one_line_error(excinfo, "does not exist")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError) as excinfo:
        CheckpointReader(tmp_path / "empty")
    _one_line_error(excinfo, "no model weights found")


def test_unindexed_safetensors_set_is_refused(tmp_path: Path) -> None:
    save_file({"a": torch.zeros(2)}, str(tmp_path / "weights-1.safetensors"))
    with pytest.raises(ModelError) as excinfo:
        CheckpointReader(tmp_path)
    _one_line_error(excinfo, "weights-1.safetensors", "model.safetensors.index.json")


def test_index_problems(damaged: Path) -> None:
    index_path = damaged / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    (damaged / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(ModelError) as excinfo:
        CheckpointReader(damaged)
    _one_line_error(excinfo, "model-00002-of-00002.safetensors", "missing")

    index["weight_map"] = {"ghost.weight": "model-00001-of-00002.safetensors"}
    index_path.write_text(json.dumps(index))
    with pytest.raises(ModelError) as excinfo:
        CheckpointReader(damaged)
    _one_line_error(excinfo, "ghost.weight", "not in this file")

    index["weight_map"] = {"w": "../outside.safetensors"}
    index_path.write_text(json.dumps(index))
    with pytest.raises(ModelError) as excinfo:
        CheckpointReader(damaged)
    _one_line_error(excinfo, "bad shard file name '../outside.safetensors'")

    index_path.write_text("{not json")
    with pytest.raises(ModelError) as excinfo:
        CheckpointReader(damaged)
    _one_line_error(excinfo, str(index_path), "unreadable index")


def test_load_config(tmp_path: Path, tiny_models: dict[str, Path]) -> None:
    assert load_config(tiny_models["a"])["model_type"] == "llama"
    with pytest.raises(ModelError, match="config.json: not found"):
        load_config(tmp_path)
    (tmp_path / "config.json").write_text('{"a": 1,,}')
    with pytest.raises(ModelError, match=r"invalid JSON \(line 1"):
        load_config(tmp_path)
    (tmp_path / "config.json").write_text("[1]")
    with pytest.raises(ModelError, match="expected a JSON object"):
        load_config(tmp_path)


def _rss_bytes() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc (Linux)")
def test_reading_tensor_by_tensor_keeps_memory_bounded(tmp_path: Path) -> None:
    """Reading a 200 MB checkpoint one tensor at a time grows RSS by far less than 200 MB."""
    file = tmp_path / "model.safetensors"
    n_tensors, rows, cols = 25, 1024, 2048  # 25 x 8 MB of float32 = 200 MB
    tensors = {f"t{i}": torch.full((rows, cols), float(i)) for i in range(n_tensors)}
    save_file(tensors, str(file))
    checkpoint = file.stat().st_size
    del tensors
    gc.collect()

    def peak_growth(dtype: torch.dtype | None) -> int:
        baseline = _rss_bytes()
        peak = baseline
        with CheckpointReader(tmp_path) as reader:
            for name in reader.names():
                t = reader.get(name, dtype=dtype)
                assert float(t[-1, -1]) == float(name[1:])  # touch the data
                assert float(t.sum()) == float(name[1:]) * rows * cols  # ... all of it
                peak = max(peak, _rss_bytes())
                del t
        return peak - baseline

    # Plain reads: about one 8 MB tensor resident (an mmap-backed read that keeps pages
    # mapped, or loading everything, would grow by ~200 MB).
    growth = peak_growth(None)
    assert growth < checkpoint // 4, f"RSS grew by {growth / 1e6:.0f} MB"
    # Cast to float64 (16 MB per tensor); the allocator keeps a few freed blocks cached, but
    # holding the cast model would be 400 MB.
    growth = peak_growth(torch.float64)
    assert growth < checkpoint // 2, f"RSS grew by {growth / 1e6:.0f} MB with a cast"
