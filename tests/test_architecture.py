"""A checkpoint's layout read from its own tensor names, shapes and config.json; configs that follow
the layers a merge writes; checkpoints that cannot be understood refused in one line."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from family_models import OURS_ONLY, build_family, load_and_run
from safetensors.torch import load_file, save_file

from merge_core.architecture import architecture_for, restack_config
from merge_core.cli import main as merge_yaml
from merge_core.errors import ModelError
from tiny_models import make_tiny_llama


def _shapes(names: dict[str, tuple[int, ...]]) -> dict[str, SimpleNamespace]:
    return {name: SimpleNamespace(shape=shape) for name, shape in names.items()}


def _decoder(prefix: str, layers: int, extra: dict[str, tuple[int, ...]] | None = None) -> dict[str, tuple]:
    out = {}
    for i in range(layers):
        out[f"{prefix}{i}.self_attn.q_proj.weight"] = (8, 8)
        out[f"{prefix}{i}.input_layernorm.weight"] = (8,)
        for suffix, shape in (extra or {}).items():
            out[f"{prefix}{i}.{suffix}"] = shape
    return out


def test_llama_layout():
    names = {"model.embed_tokens.weight": (16, 8), "model.norm.weight": (8,), "lm_head.weight": (16, 8),
             "model.layers.0.self_attn.rotary_emb.inv_freq": (4,), **_decoder("model.layers.", 3)}
    arch = architecture_for({"architectures": ["LlamaForCausalLM"], "vocab_size": 16, "num_hidden_layers": 3},
                            "m", _shapes(names))
    assert arch.layer_prefix == "model.layers." and arch.num_layers() == 3
    assert [s.name for s in arch.pre] == ["model.embed_tokens.weight"] and arch.pre[0].vocab_axis == 0
    assert [s.name for s in arch.post] == ["model.norm.weight"]
    assert arch.embedding == "model.embed_tokens.weight" and arch.head == "lm_head.weight"
    assert arch.layers[0] == ("input_layernorm.weight", "self_attn.q_proj.weight")  # no rotary buffer
    assert arch.layer_index("model.layers.2.input_layernorm.weight") == 2 and arch.layer_index("lm_head.weight") is None


def test_token_indexed_tensors_without_a_matching_vocab_size():
    """Padded embedding rows (config vocab_size 15, 16 rows): the embedding's rows index tokens."""
    names = {"model.embed_tokens.weight": (16, 8), "model.norm.weight": (8,), "lm_head.weight": (16, 8),
             **_decoder("model.layers.", 2)}
    arch = architecture_for({"architectures": ["X"], "vocab_size": 15, "num_hidden_layers": 2}, "m", _shapes(names))
    assert arch.embedding == "model.embed_tokens.weight" and arch.head == "lm_head.weight"


def test_gpt2_layout_tied_with_position_embeddings():
    names = {"transformer.wte.weight": (16, 8), "transformer.wpe.weight": (32, 8), "transformer.ln_f.weight": (8,),
             **_decoder("transformer.h.", 2)}
    arch = architecture_for({"architectures": ["GPT2LMHeadModel"], "vocab_size": 16, "n_layer": 2}, "g",
                            _shapes(names))
    assert arch.layer_prefix == "transformer.h." and arch.num_layers_key == ("n_layer",)
    assert [s.name for s in arch.pre] == ["transformer.wte.weight", "transformer.wpe.weight"]
    assert arch.head is None and arch.head_spec("lm_head.weight").tied_to == "transformer.wte.weight"


def test_experts_are_part_of_their_layer_and_a_vision_tower_is_not_the_decoder():
    moe = {f"mlp.experts.{e}.w1.weight": (4, 8) for e in range(8)}
    names = {"model.language_model.embed_tokens.weight": (16, 8), "lm_head.weight": (16, 8),
             "model.language_model.norm.weight": (8,), **_decoder("model.language_model.layers.", 2, moe),
             **_decoder("model.vision_tower.encoder.layers.", 2), "model.vision_tower.post_norm.weight": (8,)}
    config = {"architectures": ["X"], "text_config": {"vocab_size": 16, "num_hidden_layers": 2}}
    arch = architecture_for(config, "mm", _shapes(names))
    assert arch.layer_prefix == "model.language_model.layers." and arch.num_layers() == 2
    assert len(arch.layers[1]) == 10 and arch.num_layers_key == ("text_config", "num_hidden_layers")
    pre = {s.name for s in arch.pre}
    assert "model.vision_tower.encoder.layers.1.input_layernorm.weight" in pre and "model.vision_tower.post_norm.weight" in pre
    assert [s.name for s in arch.post] == ["model.language_model.norm.weight"]


@pytest.mark.parametrize(("names", "config", "message"), [
    ({"embed.weight": (16, 8), "norm.weight": (8,)}, {"num_hidden_layers": 2}, "cannot find the decoder layers: no tensor name has a numbered block"),
    ({**_decoder("model.layers.", 3), "model.layers.5.x.weight": (8,)}, {"num_hidden_layers": 6},
     "decoder layers model.layers.N are not numbered 0..5 (layer 3 is missing)"),
    (_decoder("model.layers.", 3), {"num_hidden_layers": 4},
     "config.json num_hidden_layers is 4 but the checkpoint has 3 layers (model.layers.0..2)"),
    ({**_decoder("a.layers.", 2), **_decoder("b.layers.", 2)}, {"num_hidden_layers": 2},
     "cannot tell which numbered block is the decoder's layers: a.layers.N (2), b.layers.N (2)"),
    (_decoder("model.layers.", 2), {"architectures": ["A", "B"]}, "config.json must name exactly one architecture"),
    (_decoder("model.layers.", 2), {}, "config.json has no num_hidden_layers (nor n_layer, num_layers, n_layers)"),
    (_decoder("model.layers.", 2), {"n_layer": "2"}, "config.json n_layer must be a positive integer, got '2'"),
])
def test_checkpoints_that_cannot_be_understood(names, config, message):
    with pytest.raises(ModelError) as err:
        architecture_for({"architectures": ["X"], "vocab_size": 16, **config}, "m", _shapes(names))
    assert str(err.value).startswith(f"'m': {message}"), str(err.value)


def test_merge_yaml_refuses_such_a_checkpoint_in_one_line_writing_nothing(tmp_path, capsys):
    model = make_tiny_llama(tmp_path / "flat", seed=0, tokenizer=False)
    sd = load_file(str(model / "model.safetensors"))
    save_file({name.replace("layers.", "layers_"): t for name, t in sd.items()}, str(model / "model.safetensors"))
    recipe = tmp_path / "r.yml"
    recipe.write_text(yaml.safe_dump({"merge_method": "linear", "models": [{"model": str(model),
                                                                             "parameters": {"weight": 1.0}}]}))
    assert merge_yaml([str(recipe), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "cannot find the decoder layers" in err, err
    assert not (tmp_path / "out").exists()


def test_restack_config_follows_the_written_layers():
    arch = architecture_for({"architectures": ["X"], "num_hidden_layers": 3}, "m",
                            _shapes(_decoder("model.layers.", 3)))
    config = {"num_hidden_layers": 3, "layer_types": ["sliding", "full", "sliding"], "no_rope_layers": [1, 0, 1],
              "eos_token_id": [1, 2, 3], "mlp_only_layers": [0], "decoder_sparse_step": 2,
              "text_config": {"layer_types": ["a", "b", "c"]}}
    other = {**config, "layer_types": ["s", "f", "s"]}
    out = restack_config(config, arch, [(config, 0), (config, 1), (other, 1), (config, 2)], [False, True, True, False])
    assert out["num_hidden_layers"] == 4 and out["layer_types"] == ["sliding", "full", "f", "sliding"]
    assert out["no_rope_layers"] == [1, 0, 0, 1] and out["eos_token_id"] == [1, 2, 3]
    assert out["text_config"]["layer_types"] == ["a", "b", "b", "c"]
    assert out["mlp_only_layers"] == [0, 3] and out["decoder_sparse_step"] == 1
    glm = {"num_hidden_layers": 3, "first_k_dense_replace": 1}
    assert restack_config(glm, arch, [(glm, 1), (glm, 2)], [True, True])["first_k_dense_replace"] == 0
    with pytest.raises(ModelError, match="dense layer after an MoE one"):
        restack_config(glm, arch, [(glm, 1), (glm, 0)], [True, False])


@pytest.mark.slow
@pytest.mark.parametrize("family", ["qwen2", "qwen3", "gemma2"])
def test_passthrough_that_changes_depth_writes_a_config_transformers_loads(family, tmp_path):
    """Qwen2/3 and Gemma 2 configs carry layer_types: a deeper stack keeps each layer's kind."""
    models = build_family(family, tmp_path / "models", variants=1)
    recipe = {"merge_method": "passthrough", "dtype": "float32",
              "slices": [{"sources": [{"model": str(models["base"]), "layer_range": [0, 3]}]},
                         {"sources": [{"model": str(models["m1"]), "layer_range": [1, 4]}]}]}
    (tmp_path / "r.yml").write_text(yaml.safe_dump(recipe))
    assert merge_yaml([str(tmp_path / "r.yml"), str(tmp_path / "out"), "--quiet"]) == 0
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    source = json.loads((models["base"] / "config.json").read_text())["layer_types"]
    assert config["num_hidden_layers"] == 6
    assert config["layer_types"] == [source[i] for i in (0, 1, 2, 1, 2, 3)]
    load_and_run(tmp_path / "out")


@pytest.mark.slow
def test_gemma3_multimodal_language_model_merges_and_loads(tmp_path):
    """Gemma 3's image-text class: the language model's layers are the decoder, the vision tower
    and projector are merged as tensors outside it (mergekit 0.1.5 cannot read this layout)."""
    from transformers import AutoModelForImageTextToText, Gemma3Config, Gemma3ForConditionalGeneration

    text = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 4, "num_attention_heads": 4,
            "num_key_value_heads": 2, "vocab_size": 300, "head_dim": 8, "max_position_embeddings": 128}
    vision = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
              "image_size": 32, "patch_size": 8}
    paths = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        config = Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4, image_token_index=299,
                              boi_token_index=297, eoi_token_index=298)
        Gemma3ForConditionalGeneration(config).save_pretrained(str(tmp_path / f"g{seed}"))
        paths.append(tmp_path / f"g{seed}")
    inputs = [load_file(str(p / "model.safetensors")) for p in paths]
    recipes = {
        "linear": {"merge_method": "linear", "models": [{"model": str(paths[0]), "parameters": {"weight": 0.3}},
                                                        {"model": str(paths[1]), "parameters": {"weight": 0.7}}]},
        "deeper": {"merge_method": "passthrough",
                   "slices": [{"sources": [{"model": str(paths[0]), "layer_range": [0, 3]}]},
                              {"sources": [{"model": str(paths[1]), "layer_range": [1, 4]}]}]},
    }
    for name, recipe in recipes.items():
        (tmp_path / f"{name}.yml").write_text(yaml.safe_dump({**recipe, "dtype": "float32"}))
        out = tmp_path / f"out_{name}"
        assert merge_yaml([str(tmp_path / f"{name}.yml"), str(out), "--quiet"]) == 0
        merged = load_file(str(out / "model.safetensors"))
        if name == "linear":
            assert sorted(merged) == sorted(inputs[0])
            for key, tensor in merged.items():
                torch.testing.assert_close(tensor, 0.3 * inputs[0][key] + 0.7 * inputs[1][key])
        else:
            prefix = "language_model.model.layers."
            assert torch.equal(merged[f"{prefix}4.mlp.up_proj.weight"], inputs[1][f"{prefix}2.mlp.up_proj.weight"])
            assert torch.equal(merged["vision_tower.encoder.layers.1.mlp.fc1.weight"],
                               inputs[0]["vision_tower.encoder.layers.1.mlp.fc1.weight"])
            config = json.loads((out / "config.json").read_text())["text_config"]
            assert config["num_hidden_layers"] == 6 and len(config["layer_types"]) == 6
        model, info = AutoModelForImageTextToText.from_pretrained(str(out), output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"], info
        with torch.no_grad():
            logits = model(input_ids=torch.arange(3, 15).reshape(2, 6)).logits
        assert logits.shape == (2, 6, 300) and torch.isfinite(logits).all()


def test_tiny_llama_layout_from_disk(tmp_path: Path):
    from merge_core.model_ref import load_model_info

    model = make_tiny_llama(tmp_path / "m", seed=0, tokenizer=False, tie_word_embeddings=True)
    info = load_model_info("m", model)
    arch = architecture_for(info.config, "m", info.tensors)
    assert arch.num_layers() == 4 and arch.head is None and arch.embedding == "model.embed_tokens.weight"


@pytest.mark.slow
@pytest.mark.parametrize("family", list(OURS_ONLY))
def test_families_mergekit_refuses_merge_and_load(family, tmp_path):
    """Checkpoints mergekit 0.1.5's definitions do not match (see family_models.OURS_ONLY): a linear
    merge is the weighted sum of every tensor, and a deeper stack loads and runs."""
    models = build_family(family, tmp_path / "models", variants=1)
    a, b = (load_file(str(models[k] / "model.safetensors")) for k in ("base", "m1"))
    recipes = {"linear": {"merge_method": "linear", "models": [{"model": str(models["base"]), "parameters": {"weight": 0.25}},
                                                               {"model": str(models["m1"]), "parameters": {"weight": 0.75}}]},
               "deeper": {"merge_method": "passthrough",
                          "slices": [{"sources": [{"model": str(models["base"]), "layer_range": [0, 3]}]},
                                     {"sources": [{"model": str(models["m1"]), "layer_range": [2, 4]}]}]}}
    for name, recipe in recipes.items():
        (tmp_path / f"{name}.yml").write_text(yaml.safe_dump({**recipe, "dtype": "float32"}))
        assert merge_yaml([str(tmp_path / f"{name}.yml"), str(tmp_path / name), "--quiet"]) == 0
        load_and_run(tmp_path / name)
    merged = load_file(str(tmp_path / "linear" / "model.safetensors"))
    assert sorted(merged) == sorted(a)
    for key, tensor in merged.items():
        torch.testing.assert_close(tensor, 0.25 * a[key] + 0.75 * b[key])
