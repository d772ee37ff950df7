import logging
import shutil

import open_clip
import pytest
import torch
from helpers.hf_clip import clip_model, pooled, vision_model
from PIL import Image
from safetensors.torch import save_file

from pipeline.models.checkpoints import save_state_dict
from pipeline.models.clip import SYNTHETIC_ARCH, create_model
from pipeline.models.hf_clip import clip_config_from_hf
from pipeline.models.pretrained import load_pretrained_clip, register_model_config


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    model = create_model(SYNTHETIC_ARCH, seed=7)
    folder = tmp_path_factory.mktemp("pretrained")
    torch.save(model.state_dict(), folder / "clip.pt")
    save_state_dict(model.state_dict(), folder / "clip.safetensors")
    return model.state_dict(), folder


@pytest.mark.parametrize("name", ["clip.pt", "clip.safetensors"])
def test_local_file_loads_with_transforms_and_tokenizer(saved, name):
    expected, folder = saved
    model, preprocess, tokenizer = load_pretrained_clip(SYNTHETIC_ARCH, str(folder / name))
    loaded = model.state_dict()
    assert loaded.keys() == expected.keys()
    assert all(torch.equal(loaded[k], expected[k]) for k in expected)
    assert not model.training
    assert preprocess(Image.new("RGB", (50, 40), "red")).shape == (3, 32, 32)
    assert tokenizer(["a photo", "of a cat"]).shape == (2, 20)


@pytest.mark.parametrize("arch", [SYNTHETIC_ARCH, "ViT-B-32"])
def test_unknown_tag_names_arch_and_tag_and_suggests_a_file(arch):
    with pytest.raises(ValueError) as err:
        load_pretrained_clip(arch, "no_such_tag_b79k")
    msg = str(err.value)
    assert arch in msg and "'no_such_tag_b79k'" in msg and "local checkpoint file" in msg
    if arch == "ViT-B-32":
        assert "openai" in msg  # the valid tags are listed


def test_missing_local_file_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "missing.pt")):
        load_pretrained_clip(SYNTHETIC_ARCH, str(tmp_path / "missing.pt"))


def test_unknown_architecture():
    with pytest.raises(ValueError, match="unknown open_clip architecture 'ViT-Q-99'"):
        load_pretrained_clip("ViT-Q-99", "openai")


def test_non_finite_weights_refused(saved, tmp_path):
    expected, _ = saved
    bad = {k: v.clone() for k, v in expected.items()}
    bad["logit_scale"].fill_(float("nan"))
    save_file(bad, tmp_path / "bad.safetensors")  # as a corrupt download (the pipeline never writes one)
    with pytest.raises(ValueError, match=r"bad\.safetensors: tensor 'logit_scale' contains NaN"):
        load_pretrained_clip(SYNTHETIC_ARCH, str(tmp_path / "bad.safetensors"))


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A tiny random transformers CLIPModel as save_pretrained writes it."""
    hf = clip_model(seed=11)
    folder = tmp_path_factory.mktemp("hf") / "clip"
    hf.save_pretrained(folder)
    return hf, folder


@torch.no_grad()
def test_hf_clip_model_dir_gives_the_image_and_text_features_of_transformers(hf_dir):
    hf, folder = hf_dir
    model, preprocess, tokenizer = load_pretrained_clip("hf-tiny-parity", str(folder))
    assert "hf-tiny-parity" in open_clip.list_models()  # registered from config.json
    assert open_clip.get_model_config("hf-tiny-parity") == clip_config_from_hf(hf.config)
    images = torch.randn(3, 3, 32, 32)
    ids = open_clip.get_tokenizer("ViT-B-32")(["a photo of a cat", "a diagram", ""])
    assert torch.equal(tokenizer(["a photo of a cat", "a diagram", ""]), ids)
    torch.testing.assert_close(
        model.encode_image(images), pooled(hf.get_image_features(pixel_values=images)), atol=1e-5, rtol=0
    )
    torch.testing.assert_close(
        model.encode_text(ids), pooled(hf.get_text_features(input_ids=ids)), atol=1e-5, rtol=0
    )
    assert torch.equal(model.logit_scale, hf.logit_scale)
    assert preprocess(Image.new("RGB", (50, 40), "red")).shape == (3, 32, 32)


# hf_dir's model as open_clip's own configs write it: defaults left out, an integer mlp_ratio
TINY_QUICKGELU = {
    "embed_dim": 32,
    "quick_gelu": True,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "mlp_ratio": 2, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2, "mlp_ratio": 2},
}


def test_hf_dir_under_a_known_architecture_that_agrees(hf_dir):
    hf, folder = hf_dir
    register_model_config("tiny-known-quickgelu", TINY_QUICKGELU, "test")
    model, _, _ = load_pretrained_clip("tiny-known-quickgelu", str(folder))
    assert torch.equal(model.visual.proj, hf.visual_projection.weight.t())
    assert open_clip.get_model_config("tiny-known-quickgelu") == TINY_QUICKGELU  # not replaced


def test_hf_dir_that_disagrees_with_a_known_architecture_is_refused(hf_dir):
    _, folder = hf_dir
    with pytest.raises(ValueError) as err:
        load_pretrained_clip("ViT-B-32-quickgelu", str(folder))
    msg = str(err.value)
    assert str(folder) in msg and "does not match open_clip architecture ViT-B-32-quickgelu" in msg
    assert "vision_cfg.width is 768 in ViT-B-32-quickgelu but 64 in the checkpoint" in msg
    assert "text_cfg.layers is 12 in ViT-B-32-quickgelu but 2 in the checkpoint" in msg
    assert "Set the architecture the weights were trained as" in msg
    register_model_config("tiny-twin", {**TINY_QUICKGELU, "quick_gelu": False}, "test")
    register_model_config("tiny-twin-quickgelu", TINY_QUICKGELU, "test")
    with pytest.raises(ValueError, match=r": quick_gelu is False in tiny-twin but True in the checkpoint\. "
                                         r"Set the architecture to tiny-twin-quickgelu"):
        load_pretrained_clip("tiny-twin", str(folder))


def test_hf_dir_that_is_no_clip_model_is_refused(tmp_path):
    vision_model().save_pretrained(tmp_path / "vision")
    with pytest.raises(ValueError, match=r"vision: .*not a CLIPModel config.*text tower"):
        load_pretrained_clip("hf-tiny-vision", str(tmp_path / "vision"))
    clip_model().save_pretrained(tmp_path / "noconfig")
    (tmp_path / "noconfig" / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"noconfig has no config\.json"):
        load_pretrained_clip("hf-tiny-noconfig", str(tmp_path / "noconfig"))


def test_register_refuses_another_config_under_a_known_name():
    with pytest.raises(ValueError, match=r"here\.json describes architecture 'ViT-B-32' differently"):
        register_model_config("ViT-B-32", {"embed_dim": 1, "vision_cfg": {}, "text_cfg": {}}, "here.json")


def test_local_files_are_recognised_by_content(saved, tmp_path):
    expected, folder = saved
    shutil.copy(folder / "clip.safetensors", tmp_path / "weights")
    model, _, _ = load_pretrained_clip(SYNTHETIC_ARCH, str(tmp_path / "weights"))
    assert all(torch.equal(model.state_dict()[k], expected[k]) for k in expected)
    (tmp_path / "notes.pt").write_text("no weights here")
    with pytest.raises(ValueError, match=r"notes\.pt is neither a safetensors file nor a torch\.save file"):
        load_pretrained_clip(SYNTHETIC_ARCH, str(tmp_path / "notes.pt"))


def test_local_file_of_another_model_is_refused_naming_it(hf_dir, tmp_path):
    hf, _ = hf_dir
    save_state_dict(hf.state_dict(), tmp_path / "hf.safetensors")
    hint = r"hf\.safetensors is not an open_clip .* Hugging Face CLIP keys.*save_pretrained directory"
    with pytest.raises(ValueError, match=hint):
        load_pretrained_clip(SYNTHETIC_ARCH, str(tmp_path / "hf.safetensors"))


def test_tag_trained_with_quick_gelu_needs_the_quickgelu_architecture():
    """Refused before any download: every later job rebuilds the model from its arch alone."""
    with pytest.raises(ValueError, match="trained with QuickGELU but ViT-B-32 builds GELU.*ViT-B-32-quickgelu"):
        load_pretrained_clip("ViT-B-32", "openai")


def test_create_model_drops_only_the_random_init_warning(caplog, monkeypatch):
    with caplog.at_level(logging.INFO):
        create_model(SYNTHETIC_ARCH)
    assert caplog.records and not [r for r in caplog.records if "initialized randomly" in r.getMessage()]

    def warns(*args, **kwargs):
        logging.warning("No pretrained weights loaded for model 'x'. Model initialized randomly.")
        logging.warning("something else")

    monkeypatch.setattr(open_clip, "create_model", warns)
    caplog.clear()
    create_model(SYNTHETIC_ARCH)
    assert [r.getMessage() for r in caplog.records] == ["something else"]
    logging.warning("No pretrained weights loaded for model 'y'")  # only inside create_model
    assert len(caplog.records) == 2
