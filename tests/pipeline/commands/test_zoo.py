"""The zoo import verbs through the CLI: a tiny Hugging Face CLIPModel as the pretrained model,
FusionBench-style CLIPVisionModel directories as the fine-tuned encoders."""
import json

import open_clip
import pytest
import torch
from helpers.hf_clip import clip_model, vision_model
from safetensors.torch import load_file

from pipeline.cli import main
from pipeline.models.checkpoints import save_state_dict
from pipeline.models.clip import SYNTHETIC_ARCH, create_model
from pipeline.models.hf_clip import clip_config_from_hf, hf_vision_to_open_clip
from pipeline.zoo.store import load_clip

ZOO = {"name": "t", "source": "open_clip", "arch": "hf-tiny-zoo", "trust_pickles": False}


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """The pretrained CLIP imported from a CLIPModel directory under an arch open_clip lacks."""
    root = tmp_path_factory.mktemp("zoo")
    hf = clip_model(seed=21)
    hf.save_pretrained(root / "hf")
    main(["import-pretrained", "--zoo", json.dumps(ZOO), "--source", str(root / "hf"),
          "--out", str(root / "models" / "pretrained.safetensors"), "--threads", "1"])
    return hf, root / "models" / "pretrained.safetensors"


def test_import_pretrained_writes_the_weights_and_their_model_config(imported):
    hf, pretrained = imported
    assert sorted(p.name for p in pretrained.parent.iterdir()) == ["model_config.json", "pretrained.safetensors"]
    assert json.loads((pretrained.parent / "model_config.json").read_text()) == clip_config_from_hf(hf.config)
    assert torch.equal(load_clip(ZOO, pretrained).visual.proj, hf.visual_projection.weight.t())


def test_load_clip_registers_an_arch_the_process_does_not_know(imported):
    """As in a later job, where only model_config.json tells open_clip the architecture."""
    hf, pretrained = imported
    assert "hf-tiny-zoo-later" not in open_clip.list_models()
    model = load_clip({**ZOO, "arch": "hf-tiny-zoo-later"}, pretrained)
    assert open_clip.get_model_config("hf-tiny-zoo-later") == clip_config_from_hf(hf.config)
    assert torch.equal(model.text_projection, hf.text_projection.weight.t())


def test_load_clip_refuses_a_model_config_that_disagrees_with_a_known_arch(tmp_path):
    save_state_dict(create_model(SYNTHETIC_ARCH).state_dict(), tmp_path / "pretrained.safetensors")
    (tmp_path / "model_config.json").write_text(json.dumps({"embed_dim": 8, "vision_cfg": {}, "text_cfg": {}}))
    with pytest.raises(ValueError, match=rf"model_config\.json describes architecture '{SYNTHETIC_ARCH}' differently"):
        load_clip({**ZOO, "arch": SYNTHETIC_ARCH}, tmp_path / "pretrained.safetensors")


def import_finetuned(pretrained, checkpoint, out):
    main(["import-finetuned", "--zoo", json.dumps(ZOO), "--task", "SUN397", "--pretrained", str(pretrained),
          "--checkpoint", str(checkpoint), "--out", str(out), "--threads", "1"])


def test_import_finetuned_completes_a_clip_vision_model_with_the_pretrained_projection(imported, tmp_path):
    hf, pretrained = imported
    ft = vision_model(seed=22, projection=False)
    ft.save_pretrained(tmp_path / "ft")
    import_finetuned(pretrained, tmp_path / "ft", tmp_path / "SUN397.safetensors")
    sd = load_file(tmp_path / "SUN397.safetensors")
    assert torch.equal(sd["proj"], hf.visual_projection.weight.t())
    expected = hf_vision_to_open_clip(ft.state_dict(), projection=hf.visual_projection.weight.t())
    assert sd.keys() == expected.keys() and all(torch.equal(sd[k], expected[k]) for k in sd)


def test_import_finetuned_refuses_an_encoder_of_another_architecture(imported, tmp_path):
    _, pretrained = imported
    vision_model(projection=False, num_hidden_layers=1).save_pretrained(tmp_path / "ft")
    with pytest.raises(ValueError, match=r"ft \(SUN397\) does not match .*pretrained\.safetensors: keys missing"):
        import_finetuned(pretrained, tmp_path / "ft", tmp_path / "SUN397.safetensors")
    assert not (tmp_path / "SUN397.safetensors").exists()
