import logging

import open_clip
import pytest
import torch
from PIL import Image

from pipeline.models.checkpoints import save_state_dict
from pipeline.models.clip import SYNTHETIC_ARCH, create_model
from pipeline.models.pretrained import load_pretrained_clip


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
    save_state_dict(bad, tmp_path / "bad.safetensors")
    with pytest.raises(ValueError, match=r"bad\.safetensors: tensor 'logit_scale' contains NaN"):
        load_pretrained_clip(SYNTHETIC_ARCH, str(tmp_path / "bad.safetensors"))


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
