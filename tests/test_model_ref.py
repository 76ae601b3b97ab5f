"""Model references: local directories, the HF cache (offline), safetensors headers."""

from __future__ import annotations

import hashlib
import json
import shutil
import struct
from pathlib import Path

import pytest

from merge_core.errors import ModelError
from merge_core.model_ref import (
    load_model_info,
    looks_like_repo_id,
    read_safetensors_header,
    read_tensor_index,
    resolve_model_ref,
    split_revision,
)
from tiny_models import make_tiny_llama


def plant_in_hf_cache(cache: Path, repo_id: str, model_dir: Path, *, revision: str = "main") -> Path:
    """Copy ``model_dir`` into an HF hub cache layout as ``repo_id`` at ``revision``.

    Writes ``models--org--name/snapshots/<sha>/...`` and ``refs/<revision>`` like a download
    does; returns the snapshot directory.
    """
    sha = hashlib.sha1(f"{repo_id}@{revision}".encode()).hexdigest()
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / sha
    shutil.copytree(model_dir, snapshot, dirs_exist_ok=True)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / revision).write_text(sha)
    return snapshot


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("ref") / "tiny", seed=0, tokenizer=False)


@pytest.fixture
def hf_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "hf_cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def test_split_revision_and_repo_ids():
    assert split_revision("org/name@v1") == ("org/name", "v1")
    assert split_revision("org/name") == ("org/name", None)
    with pytest.raises(ModelError):
        split_revision("a@b@c")
    assert looks_like_repo_id("org/name") and looks_like_repo_id("gpt2")
    assert not looks_like_repo_id("a/b/c") and not looks_like_repo_id("./x") and not looks_like_repo_id("a--b")


def test_local_directory_relative_to_cwd_and_recipe_dir(tiny: Path, tmp_path: Path, monkeypatch):
    assert resolve_model_ref(str(tiny)) == tiny.resolve()
    monkeypatch.chdir(tiny.parent)
    assert resolve_model_ref("tiny") == tiny.resolve()
    monkeypatch.chdir(tmp_path)
    assert resolve_model_ref("tiny", relative_to=tiny.parent) == tiny.resolve()
    assert resolve_model_ref("./tiny", relative_to=tiny.parent) == tiny.resolve()


def test_hub_id_from_cache_with_revisions(tiny: Path, hf_cache: Path):
    main = plant_in_hf_cache(hf_cache, "org/tiny", tiny)
    dev = plant_in_hf_cache(hf_cache, "org/tiny", tiny, revision="dev")
    assert resolve_model_ref("org/tiny") == main
    assert resolve_model_ref("org/tiny@dev") == dev
    assert resolve_model_ref(f"org/tiny@{main.name}") == main  # a commit sha
    assert load_model_info("org/tiny", main).config["num_hidden_layers"] == 4


def test_hf_home_is_honoured(tiny: Path, tmp_path: Path, monkeypatch):
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    snap = plant_in_hf_cache(tmp_path / "home" / "hub", "org/other", tiny)
    assert resolve_model_ref("org/other") == snap


def test_not_found_errors(hf_cache: Path, tmp_path: Path):
    with pytest.raises(ModelError) as err:
        resolve_model_ref("org/missing")
    msg = str(err.value)
    assert msg.startswith("'org/missing' is neither a directory nor in the Hugging Face cache")
    assert "offline" in msg and "\n" not in msg
    with pytest.raises(ModelError, match=r"^no such directory 'path/to/model'$"):
        resolve_model_ref("path/to/model")
    with pytest.raises(ModelError, match="unknown revision|neither a directory"):
        resolve_model_ref("org/missing@v2")
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ModelError, match="is not a directory"):
        resolve_model_ref(str(tmp_path / "afile"))


def test_a_missing_toy_zoo_model_says_how_to_build_the_zoo(hf_cache: Path, tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for ref in ("zoo/base", "./zoo/spatial", str(tmp_path / "zoo" / "arith"), "zoo/format/"):
        with pytest.raises(ModelError, match=r"; is the toy zoo built\? `python scripts/build_zoo.py` builds it"):
            resolve_model_ref(ref)
    with pytest.raises(ModelError) as err:  # not the zoo: no hint
        resolve_model_ref("models/base")
    assert "build_zoo" not in str(err.value)


def test_sharded_checkpoint_index(tmp_path: Path):
    path = make_tiny_llama(tmp_path / "sharded", seed=1, shards=3, tokenizer=False)
    tensors = read_tensor_index(path, "sharded")
    assert len({t.file for t in tensors.values()}) == 3
    assert tensors["model.embed_tokens.weight"].shape == (96, 32)
    assert tensors["model.layers.3.mlp.down_proj.weight"].dtype == "F32"
    index = json.loads((path / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.norm.weight"] = "missing-shard.safetensors"
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ModelError, match="missing shard missing-shard.safetensors"):
        read_tensor_index(path, "sharded")


def _write_raw(file: Path, header: bytes, declared: int | None = None, data: bytes = b"") -> Path:
    length = len(header) if declared is None else declared
    file.write_bytes(struct.pack("<Q", length) + header + data)
    return file


def test_corrupt_headers_name_the_file(tmp_path: Path):
    cases = {
        "short.safetensors": b"\x01\x02",
        "toolong.safetensors": struct.pack("<Q", 10**9) + b"{}",
        "badjson.safetensors": struct.pack("<Q", 5) + b"{nope",
        "notobj.safetensors": struct.pack("<Q", 2) + b"[]",
        "badentry.safetensors": None,
        "outside.safetensors": None,
    }
    for name, raw in cases.items():
        if raw is not None:
            (tmp_path / name).write_bytes(raw)
    _write_raw(tmp_path / "badentry.safetensors", json.dumps({"w": {"dtype": "F32"}}).encode())
    _write_raw(tmp_path / "outside.safetensors",
               json.dumps({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}).encode(), data=b"\0" * 8)
    for name in cases:
        with pytest.raises(ModelError) as err:
            read_safetensors_header(tmp_path / name)
        assert str(err.value).startswith(f"{tmp_path / name}: corrupt safetensors header ("), str(err.value)
    good = _write_raw(tmp_path / "good.safetensors",
                      json.dumps({"__metadata__": {"format": "pt"},
                                  "w": {"dtype": "BF16", "shape": [2, 2], "data_offsets": [0, 8]}}).encode(),
                      data=b"\0" * 8)
    info = read_safetensors_header(good)
    assert info["w"].shape == (2, 2) and info["w"].dtype == "BF16" and list(info) == ["w"]


def test_pickle_only_checkpoint_is_refused(tmp_path: Path):
    model = tmp_path / "pickled"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "pytorch_model.bin").write_bytes(b"not really a pickle")
    with pytest.raises(ModelError) as err:
        read_tensor_index(model, "org/pickled")
    assert "pytorch_model.bin" in str(err.value) and "pickles are refused" in str(err.value)
    (model / "pytorch_model.bin").unlink()
    with pytest.raises(ModelError, match="no safetensors weights"):
        read_tensor_index(model, "org/pickled")


def test_bad_config(tmp_path: Path, tiny: Path):
    copy = tmp_path / "copy"
    shutil.copytree(tiny, copy)
    (copy / "config.json").write_text("{oops")
    # one config.json reader (checkpoint_files.load_config): it names the reference and the file
    with pytest.raises(ModelError, match=r"^'copy': .*config.json: invalid JSON \(line 1"):
        load_model_info("copy", copy)
    (copy / "config.json").unlink()
    with pytest.raises(ModelError, match=r"^'copy': .*config.json: not found"):
        load_model_info("copy", copy)
