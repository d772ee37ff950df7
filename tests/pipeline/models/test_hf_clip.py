import json

import pytest
import torch
import transformers
from helpers.hf_clip import VISION, clip_model, pooled, rename_keys, vision_model
from open_clip.model import _build_vision_tower
from safetensors import safe_open

from pipeline.models.checkpoints import load_state_dict
from pipeline.models.hf_clip import clip_config_from_hf, hf_vision_to_open_clip, open_clip_config_from_hf


def open_clip_tower(hf_config, sd):
    tower = _build_vision_tower(**open_clip_config_from_hf(hf_config)).eval()
    tower.load_state_dict(sd)  # strict: every key present, none extra
    return tower


@pytest.mark.parametrize("hidden_act", ["quick_gelu", "gelu"])
@torch.no_grad()
def test_mapped_weights_give_the_same_image_embeddings(hidden_act):
    hf = vision_model(hidden_act=hidden_act)
    tower = open_clip_tower(hf.config, hf_vision_to_open_clip(hf.state_dict(), hf.config))
    images = torch.randn(3, 3, 32, 32)
    expected = hf(pixel_values=images).image_embeds
    torch.testing.assert_close(tower(images), expected, atol=1e-5, rtol=0)


def test_config_maps_to_open_clip_vision_cfg():
    cfg = open_clip_config_from_hf(vision_model().config)
    assert cfg["embed_dim"] == 32 and cfg["quick_gelu"] is True
    assert cfg["vision_cfg"] == {
        "image_size": 32,
        "patch_size": 8,
        "width": 64,
        "layers": 2,
        "head_width": 32,
        "mlp_ratio": 2.0,
        "norm_kwargs": {"eps": 1e-5},
    }
    with pytest.raises(ValueError, match="hidden_act 'relu'"):
        open_clip_config_from_hf({**VISION, "hidden_act": "relu"})


@torch.no_grad()
def test_clip_model_vision_tower_and_projection_ignoring_text():
    torch.manual_seed(1)
    text = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                vocab_size=100, max_position_embeddings=16, bos_token_id=0, eos_token_id=1)
    config = transformers.CLIPConfig(vision_config=VISION, text_config=text, projection_dim=24)
    hf = transformers.CLIPModel(config).eval()
    # a config.json dict, with the HF defaults left out as save_pretrained writes it
    config_json = {"projection_dim": 24, "vision_config": VISION}
    tower = open_clip_tower(config_json, hf_vision_to_open_clip(hf.state_dict(), config_json))
    images = torch.randn(2, 3, 32, 32)
    expected = hf.visual_projection(hf.vision_model(pixel_values=images).pooler_output)
    torch.testing.assert_close(tower(images), expected, atol=1e-5, rtol=0)


def test_hf_directory_and_bare_state_dict_load_through_load_state_dict(tmp_path):
    hf = vision_model(seed=2)
    hf.save_pretrained(tmp_path / "hf")
    expected = hf_vision_to_open_clip(hf.state_dict(), hf.config)
    loaded = load_state_dict(tmp_path / "hf")
    assert loaded.keys() == expected.keys()
    for k in expected:
        assert torch.equal(loaded[k], expected[k]), k
    # the weights file alone (no config.json), and a pytorch_model.bin-style .bin
    assert load_state_dict(tmp_path / "hf" / "model.safetensors").keys() == expected.keys()
    torch.save(hf.state_dict(), tmp_path / "hf_weights.bin")
    assert torch.equal(load_state_dict(tmp_path / "hf_weights.bin")["proj"], expected["proj"])


def test_config_that_disagrees_with_the_weights_is_refused(tmp_path):
    vision_model().save_pretrained(tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 3}))
    with pytest.raises(ValueError, match="layers is 2 in the weights but 3 in the config"):
        load_state_dict(tmp_path / "hf")


@pytest.mark.skipif(int(transformers.__version__.split(".")[0]) < 5, reason="transformers 5 layout")
def test_what_transformers_5_save_pretrained_writes(tmp_path):
    """CLIPVisionModel drops the vision_model. prefix in transformers 5; the models with a
    projection keep it."""
    for name, model in [("plain", vision_model(projection=False)), ("proj", vision_model()), ("clip", clip_model())]:
        model.save_pretrained(tmp_path / name)
        with safe_open(tmp_path / name / "model.safetensors", "pt") as f:
            keys = set(f.keys())
        patch = "embeddings.patch_embedding.weight"
        assert (patch in keys) == (name == "plain") and (f"vision_model.{patch}" in keys) == (name != "plain")
        assert ("visual_projection.weight" in keys) == (name != "plain")


def to_transformers4(key: str) -> str:
    """transformers 4's CLIPVisionModel keys: its tower behind vision_model."""
    return key if key.startswith("vision_model.") else f"vision_model.{key}"


def to_transformers5(key: str) -> str:
    """transformers 5's CLIPVisionModel keys: the tower's own, without prefix."""
    return key.removeprefix("vision_model.")


@pytest.mark.parametrize("layout", [to_transformers5, to_transformers4], ids=["transformers5", "transformers4"])
@torch.no_grad()
def test_clip_vision_model_dir_takes_the_pretrained_projection(tmp_path, layout):
    """FusionBench's format: CLIPVisionModel.save_pretrained, fine-tuned with the projection
    frozen, so the pretrained CLIP's projection completes it."""
    hf = vision_model(seed=3, projection=False)
    hf.save_pretrained(tmp_path / "ft")
    rename_keys(tmp_path / "ft" / "model.safetensors", layout)
    pretrained = hf_vision_to_open_clip(vision_model(seed=4).state_dict())
    loaded = load_state_dict(tmp_path / "ft", pretrained_visual=pretrained)
    assert loaded.keys() == pretrained.keys()
    assert torch.equal(loaded["proj"], pretrained["proj"])
    images = torch.randn(3, 3, 32, 32)
    expected = hf(pixel_values=images).pooler_output @ pretrained["proj"]
    torch.testing.assert_close(open_clip_tower(hf.config, loaded)(images), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", ["CLIPVisionModel", "CLIPVisionModelWithProjection", "CLIPModel"])
@torch.no_grad()
def test_save_pretrained_dirs_of_the_installed_transformers_give_its_image_features(tmp_path, kind):
    hf = clip_model(seed=7) if kind == "CLIPModel" else vision_model(seed=7, projection=kind != "CLIPVisionModel")
    hf.save_pretrained(tmp_path / kind)
    pretrained = hf_vision_to_open_clip(vision_model(seed=8).state_dict())
    loaded = load_state_dict(tmp_path / kind, pretrained_visual=pretrained)
    images = torch.randn(2, 3, 32, 32)
    if kind == "CLIPModel":
        expected = pooled(hf.get_image_features(pixel_values=images))
    elif kind == "CLIPVisionModelWithProjection":
        expected = hf(pixel_values=images).image_embeds
    else:
        expected = hf(pixel_values=images).pooler_output @ pretrained["proj"]
    tower = open_clip_tower(hf.config.vision_config if kind == "CLIPModel" else hf.config, loaded)
    torch.testing.assert_close(tower(images), expected, atol=1e-5, rtol=0)


def test_clip_vision_model_without_pretrained_is_refused_naming_the_file(tmp_path):
    vision_model(projection=False).save_pretrained(tmp_path / "ft")
    with pytest.raises(ValueError, match=r"ft: .*no 'visual_projection\.weight'.*CLIPVisionModel.*pretrained_visual"):
        load_state_dict(tmp_path / "ft")


def test_own_projection_is_kept_when_pretrained_is_given(tmp_path):
    hf = vision_model(seed=5)
    hf.save_pretrained(tmp_path / "ft")
    pretrained = hf_vision_to_open_clip(vision_model(seed=6).state_dict())
    loaded = load_state_dict(tmp_path / "ft", pretrained_visual=pretrained)
    assert torch.equal(loaded["proj"], hf.visual_projection.weight.t())


def test_clip_model_config_maps_both_towers():
    cfg = clip_config_from_hf(clip_model().config)
    assert cfg["embed_dim"] == 32 and cfg["quick_gelu"] is True and cfg["vision_cfg"]["width"] == 64
    assert cfg["text_cfg"] == {
        "context_length": 77,
        "vocab_size": 49408,
        "width": 32,
        "heads": 2,
        "layers": 2,
        "mlp_ratio": 2.0,
        "norm_kwargs": {"eps": 1e-5},
    }
    config = clip_model().config.to_dict()
    with pytest.raises(ValueError, match="not a CLIPModel config"):
        clip_config_from_hf(config["vision_config"])
    with pytest.raises(ValueError, match="text tower uses hidden_act 'gelu'.*one activation"):
        clip_config_from_hf({**config, "text_config": {**config["text_config"], "hidden_act": "gelu"}})
    with pytest.raises(ValueError, match="eos_token_id 7"):
        clip_config_from_hf({**config, "text_config": {**config["text_config"], "eos_token_id": 7}})
    legacy = {**config, "text_config": {**config["text_config"], "eos_token_id": 2}}
    assert clip_config_from_hf(legacy)["text_cfg"] == cfg["text_cfg"]  # pooled at the argmax too


def test_mlp_ratio_rebuilds_the_exact_intermediate_size():
    """352 * (480 / 352) is 479.99...: open_clip's int() would build a 479-wide MLP."""
    ratio = open_clip_config_from_hf({**VISION, "hidden_size": 352, "num_attention_heads": 4,
                                      "intermediate_size": 480})["vision_cfg"]["mlp_ratio"]
    assert int(352 * ratio) == 480


def test_unknown_vision_key_is_refused():
    sd = dict(vision_model().state_dict())
    sd["vision_model.encoder.layers.0.extra_gate.weight"] = torch.ones(1)
    with pytest.raises(ValueError, match="vision tower has keys with no open_clip counterpart.*extra_gate"):
        hf_vision_to_open_clip(sd)


def test_empty_directory_names_expected_files(tmp_path):
    (tmp_path / "hf").mkdir()
    with pytest.raises(FileNotFoundError, match="model.safetensors, pytorch_model.bin"):
        load_state_dict(tmp_path / "hf")
