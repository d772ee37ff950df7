"""Task splits: real tasks read from their image caches, unlabeled images for AdaMerging."""
import pytest
import torch
from helpers.images import SHAPES, Items, pil_images
from torch.utils.data import Subset, TensorDataset

from pipeline.data.image_cache import DecodedImages, UnlabeledImages, decode_split
from pipeline.data.tasks import as_tensors, load_split, unlabeled


def test_load_split_reads_a_real_tasks_split_from_its_cache(tmp_path):
    decode_split(Items(pil_images()), 32, tmp_path / "EuroSAT" / "val", threads=1)
    zoo = {"source": "open_clip", "arch": "synth-vit-tiny", "data_root": str(tmp_path / "raw")}
    split = load_split(zoo, "EuroSAT", "val", tmp_path / "EuroSAT")
    assert isinstance(split, DecodedImages) and len(split) == len(SHAPES)
    with pytest.raises(FileNotFoundError, match="EuroSAT/test"):
        load_split(zoo, "EuroSAT", "test", tmp_path / "EuroSAT")
    with pytest.raises(ValueError, match="32px images but ViT-B-32 takes 224px"):
        load_split({**zoo, "arch": "ViT-B-32"}, "EuroSAT", "val", tmp_path / "EuroSAT")


def test_unlabeled_reads_caches_row_by_row_and_stacks_the_rest(tmp_path):
    decode_split(Items(pil_images()), 32, tmp_path / "c", threads=1)
    cache = DecodedImages(tmp_path / "c")
    rows = torch.tensor([6, 1, 4])
    view = unlabeled(cache, rows)
    assert isinstance(view, UnlabeledImages) and torch.equal(view[torch.arange(3)], cache[rows][0])
    assert torch.equal(as_tensors(cache)[0], cache[:][0])
    tensors = TensorDataset(*cache[:])
    assert unlabeled(tensors) is tensors.tensors[0]
    assert torch.equal(unlabeled(tensors, rows), as_tensors(Subset(tensors, rows.tolist()))[0])


def test_hub_datasets_take_class_names_and_templates_from_the_suite():
    """SUN397's label order is its source's: with Hub datasets the suite's list, needing no data_root."""
    from pipeline.data import suites
    from pipeline.data.tasks import task_prompts

    zoo = {"source": "open_clip", "datasets": {"source": "hub"}}
    for name in ("SUN397", "Flowers102"):
        classnames, templates = task_prompts(zoo, name)
        assert classnames == list(suites.task(name).classnames) and templates == list(suites.task(name).templates)
