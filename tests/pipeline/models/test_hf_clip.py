import json

import pytest
import torch
import transformers
from open_clip.model import _build_vision_tower

from pipeline.models.checkpoints import load_state_dict
from pipeline.models.hf_clip import hf_vision_to_open_clip, open_clip_config_from_hf

TINY = dict(
    image_size=32,
    patch_size=8,
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=128,
    projection_dim=32,
)


def tiny_hf(hidden_act="quick_gelu", seed=0):
    torch.manual_seed(seed)
    config = transformers.CLIPVisionConfig(**TINY, hidden_act=hidden_act)
    return transformers.CLIPVisionModelWithProjection(config).eval()


def open_clip_tower(hf_config, sd):
    tower = _build_vision_tower(**open_clip_config_from_hf(hf_config)).eval()
    tower.load_state_dict(sd)  # strict: every key present, none extra
    return tower


@pytest.mark.parametrize("hidden_act", ["quick_gelu", "gelu"])
@torch.no_grad()
def test_mapped_weights_give_the_same_image_embeddings(hidden_act):
    hf = tiny_hf(hidden_act)
    tower = open_clip_tower(hf.config, hf_vision_to_open_clip(hf.state_dict(), hf.config))
    images = torch.randn(3, 3, 32, 32)
    expected = hf(pixel_values=images).image_embeds
    torch.testing.assert_close(tower(images), expected, atol=1e-5, rtol=0)


def test_config_maps_to_open_clip_vision_cfg():
    cfg = open_clip_config_from_hf(tiny_hf().config)
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
        open_clip_config_from_hf({**TINY, "hidden_act": "relu"})


@torch.no_grad()
def test_clip_model_vision_tower_and_projection_ignoring_text():
    torch.manual_seed(1)
    text = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                vocab_size=100, max_position_embeddings=16, bos_token_id=0, eos_token_id=1)
    config = transformers.CLIPConfig(vision_config=TINY, text_config=text, projection_dim=24)
    hf = transformers.CLIPModel(config).eval()
    # a config.json dict, with the HF defaults left out as save_pretrained writes it
    config_json = {"projection_dim": 24, "vision_config": TINY}
    tower = open_clip_tower(config_json, hf_vision_to_open_clip(hf.state_dict(), config_json))
    images = torch.randn(2, 3, 32, 32)
    expected = hf.visual_projection(hf.vision_model(pixel_values=images).pooler_output)
    torch.testing.assert_close(tower(images), expected, atol=1e-5, rtol=0)


def test_hf_directory_and_bare_state_dict_load_through_load_state_dict(tmp_path):
    hf = tiny_hf(seed=2)
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
    tiny_hf().save_pretrained(tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 3}))
    with pytest.raises(ValueError, match="layers is 2 in the weights but 3 in the config"):
        load_state_dict(tmp_path / "hf")


def test_vision_model_without_projection_is_refused():
    torch.manual_seed(0)
    hf = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**TINY))
    with pytest.raises(ValueError, match="visual_projection.weight.*CLIPVisionModelWithProjection"):
        hf_vision_to_open_clip(hf.state_dict())


def test_unknown_vision_key_is_refused():
    sd = dict(tiny_hf().state_dict())
    sd["vision_model.encoder.layers.0.extra_gate.weight"] = torch.ones(1)
    with pytest.raises(ValueError, match="no open_clip counterpart.*extra_gate"):
        hf_vision_to_open_clip(sd)


def test_empty_directory_names_expected_files(tmp_path):
    (tmp_path / "hf").mkdir()
    with pytest.raises(FileNotFoundError, match="model.safetensors, pytorch_model.bin"):
        load_state_dict(tmp_path / "hf")
