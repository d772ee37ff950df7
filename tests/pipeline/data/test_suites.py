import dataclasses

import pytest

from pipeline.data import paper_datasets
from pipeline.data.suites import MODEL_REPOS, SUITES, TASKS, model_repo, suite, task

CLASS_COUNTS = {
    "SUN397": 397, "Cars": 196, "RESISC45": 45, "EuroSAT": 10, "SVHN": 10, "GTSRB": 43, "MNIST": 10,
    "DTD": 47, "Flowers102": 102, "PCAM": 2, "FER2013": 7, "OxfordIIITPet": 37, "STL10": 10,
    "CIFAR100": 100, "CIFAR10": 10, "Food101": 101, "FashionMNIST": 10, "EMNIST": 26, "KMNIST": 10,
    "RenderedSST2": 2,
}


def test_suites_grow_8_14_20_each_extending_the_previous():
    sizes = {name: len(tasks) for name, tasks in SUITES.items()}
    assert sizes == {"TA8": 8, "TALL14": 14, "TALL20": 20}
    assert SUITES["TALL14"][:8] == SUITES["TA8"] and SUITES["TALL20"][:14] == SUITES["TALL14"]
    assert SUITES["TA8"] == ("SUN397", "Cars", "RESISC45", "EuroSAT", "SVHN", "GTSRB", "MNIST", "DTD")
    assert [spec.name for spec in suite("TALL20")] == list(SUITES["TALL20"]) == list(TASKS)


def test_suites_hold_the_tall_masks_task_sets():
    tall = ["Cars", "DTD", "EuroSAT", "GTSRB", "MNIST", "RESISC45", "SVHN", "SUN397", "STL10",
            "OxfordIIITPet", "Flowers102", "CIFAR100", "PCAM", "FER2013", "CIFAR10", "Food101",
            "FashionMNIST", "RenderedSST2", "EMNIST", "KMNIST"]  # nik-dim/tall_masks order
    for size, name in ((8, "TA8"), (14, "TALL14"), (20, "TALL20")):
        assert set(SUITES[name]) == set(tall[:size])


def test_class_counts_and_no_duplicate_names():
    assert {name: len(spec.classnames) for name, spec in TASKS.items()} == CLASS_COUNTS
    for spec in TASKS.values():
        assert len(set(spec.classnames)) == len(spec.classnames), spec.name


def test_every_template_takes_the_class_name_once():
    for spec in TASKS.values():
        assert spec.templates, spec.name
        assert all(t.count("{}") == 1 and "{}" in t.format("{}") for t in spec.templates), spec.name
    assert task("CIFAR10").templates[9].format("cat") == "a photo of the cat."
    assert task("CIFAR100").templates[-1].format("bee") == "a photo of the big bee."
    assert task("PCAM").templates == ("this is a photo of {}",)


def test_hub_datasets_where_they_differ_from_the_usual():
    assert (task("SVHN").dataset, task("SVHN").config) == ("ufldl-stanford/svhn", "cropped_digits")
    assert task("Food101").test_split == "validation"
    assert (task("PCAM").val_split, task("PCAM").test_split) == ("valid", "test")
    assert (task("FER2013").image_column, task("FER2013").label_column) == ("jpg", "cls")
    assert task("EMNIST").hub_name == "emnist_letters" and task("EMNIST").classnames[0] == "A"
    assert len({spec.hub_name for spec in TASKS.values()}) == len(TASKS)


def test_model_repos_are_the_published_names():
    assert model_repo("ViT-B-32", "Cars") == "tanganke/clip-vit-base-patch32_stanford-cars"
    assert model_repo("ViT-B-16", "Flowers102") == "tanganke/clip-vit-base-patch16_oxford_flowers102"
    assert model_repo("ViT-L-14", "OxfordIIITPet") == "tanganke/clip-vit-large-patch14_oxford-iiit-pet"
    assert model_repo("ViT-B-32", "RenderedSST2") == "tanganke/clip-vit-base-patch32_rendered-sst2"
    assert {arch: base for arch, (base, _) in MODEL_REPOS.items()} == {
        "ViT-B-32": "openai/clip-vit-base-patch32",
        "ViT-B-16": "openai/clip-vit-base-patch16",
        "ViT-L-14": "openai/clip-vit-large-patch14",
    }


def test_unknown_names_list_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown task 'cars'; known: SUN397, Cars, .*, RenderedSST2$"):
        task("cars")
    with pytest.raises(ValueError, match="unknown task 'ImageNet'"):
        model_repo("ViT-B-32", "ImageNet")
    with pytest.raises(ValueError, match="unknown architecture 'ViT-H-14'; known: ViT-B-32, ViT-B-16, ViT-L-14"):
        model_repo("ViT-H-14", "Cars")
    with pytest.raises(ValueError, match="unknown suite 'TALL8'; known: TA8, TALL14, TALL20"):
        suite("TALL8")


def test_specs_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        task("MNIST").name = "mnist"


def test_paper_datasets_read_their_names_and_templates_from_the_suites():
    assert paper_datasets.PAPER_DATASETS == SUITES["TA8"]
    for name in paper_datasets.PAPER_DATASETS:
        assert paper_datasets.templates(name) == list(task(name).templates)
        if name not in ("SUN397", "Cars"):  # these two read theirs from the data
            assert paper_datasets.classnames(name) == list(task(name).classnames)


def test_datasets_read_from_main_except_webdataset_repos_from_their_parquet_branch():
    revisions = {spec.name: spec.revision for spec in suite("TALL20")}
    assert revisions.pop("FER2013") == "refs/convert/parquet"
    assert set(revisions.values()) == {"main"}
