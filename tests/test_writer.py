"""ShardedModelWriter, parse_size, copy_tokenizer_files and the model card, on real tiny models."""

from __future__ import annotations

import json
import os
import subprocess
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file

from merge_core.errors import MergeError
from merge_core.model_card import render_model_card
from merge_core.tensor_io import CheckpointReader
from merge_core.writer import ShardedModelWriter, copy_tokenizer_files, parse_size


def _state_dict(model_dir: Path) -> dict[str, torch.Tensor]:
    with CheckpointReader(model_dir) as reader:
        return {name: reader.get(name) for name in reader.names()}


def _write_model(
    src: Path, out: Path, max_shard_size: int, dtype: torch.dtype | None = None
) -> Path:
    with CheckpointReader(src) as reader, ShardedModelWriter(out, max_shard_size) as writer:
        for name in reader.names():
            writer.add(name, reader.get(name, dtype=dtype))
        config = json.loads((src / "config.json").read_text())
        if dtype is not None:
            config["torch_dtype"] = str(dtype).removeprefix("torch.")
        writer.write_text("config.json", json.dumps(config))
        copy_tokenizer_files(src, writer)
        assert not out.exists() or out.is_dir()  # nothing in place before finalize
        writer.finalize()
    return out


@pytest.mark.parametrize(
    "text, expected",
    [("5B", 5 * 10**9), ("500M", 500 * 10**6), ("1k", 1000), ("2b", 2 * 10**9), ("123", 123),
     (" 7M ", 7 * 10**6), ("0", 0), (42, 42)],
)  # fmt: skip
def test_parse_size_decimal_multiples(text: str | int, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["1.5B", "5G", "5GB", "", "B", "-1", "ten"])
def test_parse_size_rejects_what_mergekit_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="K, M or B"):
        parse_size(text)


def _tensors_of(out: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for file in out.glob("*.safetensors"):
        with safe_open(str(file), framework="pt") as fh:
            assert fh.metadata() == {"format": "pt"}
        tensors.update(load_file(str(file)))
    return tensors


def test_single_shard_round_trip_through_transformers(
    tmp_path: Path, tiny_models: dict[str, Path]
) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = _write_model(tiny_models["b"], tmp_path / "out", parse_size("5B"))
    names = sorted(p.name for p in out.iterdir())
    assert "model.safetensors" in names and "model.safetensors.index.json" not in names
    expected = _state_dict(tiny_models["b"])
    written = _tensors_of(out)
    assert written.keys() == expected.keys()
    assert all(torch.equal(written[n], expected[n]) for n in expected)

    model = AutoModelForCausalLM.from_pretrained(out)
    loaded = model.state_dict()
    assert all(torch.equal(loaded[n], expected[n]) for n in expected)
    tok = AutoTokenizer.from_pretrained(out)
    reference = AutoTokenizer.from_pretrained(tiny_models["b"])
    assert tok("w1 w2")["input_ids"] == reference("w1 w2")["input_ids"]
    assert not list(tmp_path.glob(".out.*"))  # no temp or aside directories left over


def test_many_shards_like_transformers(tmp_path: Path, tiny_models: dict[str, Path]) -> None:
    from transformers import AutoModelForCausalLM

    limit = 20_000  # bytes; the tiny model is ~170 KB in float32, its largest tensor 12 KB
    out = _write_model(tiny_models["a"], tmp_path / "out", limit, dtype=torch.bfloat16)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    count = len(shards)
    assert count > 2
    assert shards == [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]
    assert set(index["weight_map"].values()) == set(shards)

    expected = {n: t.to(torch.bfloat16) for n, t in _state_dict(tiny_models["a"]).items()}
    total = sum(t.numel() * t.element_size() for t in expected.values())
    assert index["metadata"]["total_size"] == total
    for shard in shards:
        part = load_file(str(out / shard))
        assert sum(t.numel() * t.element_size() for t in part.values()) <= limit
        assert all(index["weight_map"][n] == shard for n in part)
    # Greedy packing in insertion order, like mergekit: a shard closes only when the next
    # tensor would not fit.
    sizes = [t.numel() * t.element_size() for t in expected.values()]
    greedy, current = 1, 0
    for size in sizes:
        if current and current + size > limit:
            greedy, current = greedy + 1, 0
        current += size
    assert count == greedy

    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16)
    loaded = model.state_dict()
    assert all(torch.equal(loaded[n], expected[n]) for n in expected)


def test_tensor_larger_than_limit_gets_its_own_shard(tmp_path: Path) -> None:
    with ShardedModelWriter(tmp_path / "out", 100) as writer:
        writer.add("small.a", torch.zeros(10))  # 40 bytes
        writer.add("big", torch.zeros(100))  # 400 bytes > limit
        writer.add("small.b", torch.zeros(10))
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == 3


def test_unusual_tensors_round_trip(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(0)
    tensors = {
        "bf16": torch.randn(3, 5, generator=gen).to(torch.bfloat16),
        "f16": torch.randn(7, generator=gen).half(),
        "f64": torch.randn(2, 2, generator=gen).double(),
        "i64": torch.arange(5),
        "u8": torch.arange(3, dtype=torch.uint8),
        "flag": torch.tensor([True, False, True]),
        "scalar": torch.tensor(3.5),
        "empty": torch.zeros(0, 4),
        "transposed": torch.randn(4, 6, generator=gen).t(),  # not contiguous
        "slice": torch.randn(10, generator=gen)[2:5],  # a view into a larger storage
    }
    with ShardedModelWriter(tmp_path / "out", 0) as writer:
        for name, tensor in tensors.items():
            writer.add(name, tensor)
    loaded = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert loaded.keys() == tensors.keys()
    for name, tensor in tensors.items():
        assert loaded[name].dtype == tensor.dtype and torch.equal(loaded[name], tensor), name
    with CheckpointReader(tmp_path / "out") as reader:  # our header validation accepts it too
        assert torch.equal(reader.get("transposed"), tensors["transposed"])


def test_exception_leaves_no_trace(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="boom"):
        with ShardedModelWriter(out, 50) as writer:
            for i in range(5):
                writer.add(f"t{i}", torch.zeros(10))  # several shards already on disk
            writer.write_text("config.json", "{}")
            assert len(list(writer.tmp_dir.iterdir())) >= 3
            raise RuntimeError("boom")
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_existing_output_untouched_on_failure_and_replaced_on_success(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text('{"old": true}')
    stale = ["model-00001-of-00003.safetensors", "model.safetensors.index.json"]
    for name in stale:
        (out / name).write_text("old")

    with pytest.raises(KeyboardInterrupt):
        with ShardedModelWriter(out, 0) as writer:
            writer.add("w", torch.ones(3))
            raise KeyboardInterrupt
    assert sorted(p.name for p in out.iterdir()) == sorted(["config.json", *stale])

    with ShardedModelWriter(out, 0) as writer:
        writer.add("w", torch.ones(3))
        writer.write_text("config.json", '{"new": true}')
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    assert json.loads((out / "config.json").read_text()) == {"new": True}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_refuses_to_replace_a_directory_that_is_not_a_model(tmp_path: Path) -> None:
    precious = tmp_path / "home"
    precious.mkdir()
    (precious / "thesis.tex").write_text("years of work")
    with pytest.raises(MergeError, match="does not look like a model"):
        ShardedModelWriter(precious, 0)
    (tmp_path / "file").write_text("x")
    with pytest.raises(MergeError, match="not a directory"):
        ShardedModelWriter(tmp_path / "file", 0)
    assert (precious / "thesis.tex").read_text() == "years of work"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "home"]


def test_stale_temp_dirs_of_dead_processes_are_removed(tmp_path: Path) -> None:
    proc = subprocess.Popen(["true"])
    proc.wait()
    stale = tmp_path / f".out.tmp-{proc.pid}"
    stale.mkdir()
    (stale / "model-part.safetensors").write_text("half")
    alive = tmp_path / f".out.tmp-{os.getppid()}"  # a live process: not ours to delete
    alive.mkdir()
    with ShardedModelWriter(tmp_path / "out", 0) as writer:
        writer.add("w", torch.ones(1))
    assert not stale.exists() and alive.exists()


def test_misuse_is_reported(tmp_path: Path) -> None:
    writer = ShardedModelWriter(tmp_path / "out", 0)
    writer.add("w", torch.ones(1))
    with pytest.raises(ValueError, match="already added"):
        writer.add("w", torch.ones(1))
    reserved = ["model.safetensors", "model-00001-of-00002.safetensors"]
    for bad in ["../escape.txt", "/abs.txt", *reserved]:
        with pytest.raises(ValueError):
            writer.write_text(bad, "x")
    writer.write_text("sub/dir/notes.txt", "ok")
    assert writer.finalize() == (tmp_path / "out").resolve()
    assert (tmp_path / "out" / "sub" / "dir" / "notes.txt").read_text() == "ok"
    with pytest.raises(RuntimeError, match="finalized"):
        writer.add("x", torch.ones(1))
    with pytest.raises(ValueError, match="no tensors"):
        ShardedModelWriter(tmp_path / "empty", 0).finalize()
    assert not (tmp_path / "empty").exists()


def test_pickle_output_when_safe_serialization_is_off(tmp_path: Path) -> None:
    with ShardedModelWriter(tmp_path / "out", 50, safe_serialization=False) as writer:
        for i in range(3):
            writer.add(f"t{i}", torch.full((10,), float(i)))
    index = json.loads((tmp_path / "out" / "pytorch_model.bin.index.json").read_text())
    assert index["weight_map"]["t2"] == "pytorch_model-00003-of-00003.bin"
    part = torch.load(tmp_path / "out" / "pytorch_model-00003-of-00003.bin", weights_only=True)
    assert torch.equal(part["t2"], torch.full((10,), 2.0))


def test_copy_tokenizer_files(tmp_path: Path, tiny_models: dict[str, Path]) -> None:
    src = tmp_path / "src"
    src.mkdir()
    for name in ["tokenizer.json", "tokenizer_config.json"]:
        (src / name).write_text((tiny_models["a"] / name).read_text())
    (src / "generation_config.json").write_text('{"do_sample": false}')
    (src / "chat_template.jinja").write_text("{{ messages }}")
    (src / "additional_chat_templates").mkdir()
    (src / "additional_chat_templates" / "tool.jinja").write_text("{{ tools }}")
    (src / "unrelated.txt").write_text("no")
    with ShardedModelWriter(tmp_path / "out", 0) as writer:
        writer.add("w", torch.ones(1))
        copied = copy_tokenizer_files(src, writer)
    assert sorted(copied) == sorted([
        "tokenizer.json", "tokenizer_config.json", "generation_config.json",
        "chat_template.jinja", "additional_chat_templates/tool.jinja",
    ])  # fmt: skip
    out = tmp_path / "out"
    assert not (out / "unrelated.txt").exists()
    assert (out / "additional_chat_templates" / "tool.jinja").read_text() == "{{ tools }}"
    assert (out / "tokenizer.json").read_bytes() == (src / "tokenizer.json").read_bytes()


RECIPE = textwrap.dedent(
    """\
    merge_method: ties
    base_model: meta-llama/Llama-3.1-8B
    models:
      - model: org/fine-tune-a@main
        parameters: {weight: 0.5, density: 0.5}
      - model: ./local/model-b
        parameters: {weight: 0.5, density: 0.5}
    dtype: bfloat16
    # a comment with ``` inside
    """
)


def test_model_card() -> None:
    refs = ["meta-llama/Llama-3.1-8B", "org/fine-tune-a@main", "./local/model-b"]
    card = render_model_card(RECIPE, refs, "ties", "meta-llama/Llama-3.1-8B")
    assert card.startswith("---\n")
    front = yaml.safe_load(card.split("---\n")[1])
    assert front == {
        "base_model": ["meta-llama/Llama-3.1-8B", "org/fine-tune-a"],
        "library_name": "transformers",
        "tags": ["merge", "merge-evolve"],
    }
    assert "**ties**" in card and "./local/model-b" in card
    hub_link = "[meta-llama/Llama-3.1-8B](https://huggingface.co/meta-llama/Llama-3.1-8B)"
    assert f"{hub_link} (base)" in card
    # The recipe is embedded verbatim, in a fence the recipe's own backticks cannot close.
    body = card.split("````yaml\n", 1)[1].split("\n````", 1)[0]
    assert yaml.safe_load(body) == yaml.safe_load(RECIPE)
    assert body == RECIPE.rstrip("\n")


def test_model_card_without_hub_models() -> None:
    card = render_model_card("merge_method: linear\n", ["/abs/a", "/abs/b"], "linear", None)
    front = yaml.safe_load(card.split("---\n")[1])
    assert "base_model" not in front and front["tags"] == ["merge", "merge-evolve"]
    assert "```yaml\nmerge_method: linear\n```" in card and "Base model" not in card


@pytest.mark.slow
@pytest.mark.mergekit
def test_shard_layout_matches_mergekit(tmp_path: Path, tiny_models: dict[str, Path], mergekit_py: str) -> None:
    """Same tensors, same order, same --out-shard-size: the same shards as mergekit's writer."""
    src = tiny_models["a"]
    script = textwrap.dedent(
        f"""
        from mergekit.common import parse_kmb
        from mergekit.io.tensor_writer import TensorWriter
        from safetensors.torch import load_file
        sd = load_file({str(src / "model.safetensors")!r})
        w = TensorWriter({str(tmp_path / "mk")!r}, max_shard_size=parse_kmb("30k"))
        for name, t in sd.items():
            w.save_tensor(name, t)
        w.finalize()
        """
    )
    subprocess.run([mergekit_py, "-c", script], check=True, capture_output=True)
    sd = load_file(str(src / "model.safetensors"))  # same (header) order as the script
    with ShardedModelWriter(tmp_path / "ours", parse_size("30k")) as writer:
        for name, tensor in sd.items():
            writer.add(name, tensor)
    theirs = json.loads((tmp_path / "mk" / "model.safetensors.index.json").read_text())
    ours = json.loads((tmp_path / "ours" / "model.safetensors.index.json").read_text())
    assert ours["weight_map"] == theirs["weight_map"]
    assert ours["metadata"]["total_size"] == theirs["metadata"]["total_size"]
    for shard in set(ours["weight_map"].values()):
        a, b = load_file(str(tmp_path / "mk" / shard)), load_file(str(tmp_path / "ours" / shard))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_views_of_reused_buffers_are_copied(tmp_path: Path) -> None:
    """A caller that merges into one scratch buffer and adds slices of it gets what it added."""
    scratch = torch.zeros(100)
    with ShardedModelWriter(tmp_path / "out", 0) as writer:
        for i in range(3):
            scratch.fill_(float(i))
            writer.add(f"t{i}", scratch[:10])
        assert writer.buffered_bytes == 3 * 40
    loaded = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert all(torch.equal(loaded[f"t{i}"], torch.full((10,), float(i))) for i in range(3))
