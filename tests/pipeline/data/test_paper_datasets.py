import struct

import numpy as np
import pytest
from PIL import Image
from torchvision.transforms import PILToTensor

from pipeline.data.paper_datasets import (
    PAPER_DATASETS,
    classnames,
    hold_out,
    load_paper_dataset,
    templates,
)


def write_folder(split_dir, classes, per_class):
    """Tiny PNGs whose red channel encodes the class index and green the image index."""
    for label, name in enumerate(classes):
        (split_dir / name).mkdir(parents=True)
        for j in range(per_class):
            Image.new("RGB", (4, 4), (10 * label, j, 0)).save(split_dir / name / f"{j}.png")


def items(dataset):
    return [(int(x[0, 0, 0]), int(x[1, 0, 0]), y) for x, y in (dataset[i] for i in range(len(dataset)))]


@pytest.fixture
def mnist_folder(tmp_path):
    digits = [str(i) for i in range(10)]
    write_folder(tmp_path / "MNIST" / "train", digits, per_class=3)
    write_folder(tmp_path / "MNIST" / "test", digits, per_class=1)
    return tmp_path


def test_image_folder_labels_follow_class_folders(mnist_folder):
    test = load_paper_dataset("MNIST", mnist_folder, "test", PILToTensor())
    assert sorted(items(test)) == [(10 * d, 0, d) for d in range(10)]
    assert test.classnames == [str(d) for d in range(10)]


def test_val_is_carved_from_train_deterministically_and_disjoint(mnist_folder):
    train = items(load_paper_dataset("MNIST", mnist_folder, "train", PILToTensor()))
    val = items(load_paper_dataset("MNIST", mnist_folder, "val", PILToTensor()))
    assert len(val) == 3 and len(train) == 27  # 10% of 30
    assert sorted(train + val) == sorted((10 * d, j, d) for d in range(10) for j in range(3))
    assert items(load_paper_dataset("MNIST", mnist_folder, "val", PILToTensor())) == val
    assert all(r == 10 * y for r, _, y in train + val)


def test_hold_out_matches_the_task_vectors_validation_split():
    kept, held = hold_out(60000)
    assert (len(kept), len(held)) == (55000, 5000)
    assert kept[0] == 36044  # the task_vectors code asserts this for MNISTVal
    assert not set(kept) & set(held)


def test_torchvision_mnist_files_are_used_with_grayscale_made_rgb(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for prefix, n in (("train", 20), ("t10k", 5)):
        labels = np.arange(n, dtype=np.uint8) % 10
        images = np.repeat(labels * 20, 28 * 28).astype(np.uint8)
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(struct.pack(">IIII", 2051, n, 28, 28) + images.tobytes())
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(struct.pack(">II", 2049, n) + labels.tobytes())
    test = load_paper_dataset("MNIST", tmp_path, "test", PILToTensor())
    image, label = test[3]
    assert image.shape == (3, 28, 28) and label == 3 and int(image[2, 5, 5]) == 60
    assert len(load_paper_dataset("MNIST", tmp_path, "val", None)) == 2
    assert len(load_paper_dataset("MNIST", tmp_path, "train", None)) == 18


def test_torchvision_eurosat_without_splits_is_carved_into_three(tmp_path):
    folders = ["AnnualCrop", "Forest", "HerbaceousVegetation", "Highway", "Industrial",
               "Pasture", "PermanentCrop", "Residential", "River", "SeaLake"]
    write_folder(tmp_path / "eurosat" / "2750", folders, per_class=3)
    splits = {s: items(load_paper_dataset("EuroSAT", tmp_path, s, PILToTensor())) for s in ("train", "val", "test")}
    assert {s: len(v) for s, v in splits.items()} == {"train": 25, "val": 2, "test": 3}
    assert sorted(sum(splits.values(), [])) == sorted((10 * c, j, c) for c in range(10) for j in range(3))
    names = load_paper_dataset("EuroSAT", tmp_path, "test", None).classnames
    assert names[0] == "annual crop land" and names[-1] == "lake or sea"


def test_sun397_names_come_from_the_data_cleaned(tmp_path):
    write_folder(tmp_path / "SUN397" / "test", ["a_abbey", "b_balcony_interior", "c_car_interior_frontseat"], 1)
    expected = ["abbey", "balcony interior", "car interior frontseat"]
    assert classnames("SUN397", tmp_path) == expected
    with pytest.raises(ValueError, match="pass the data root"):
        classnames("SUN397")


def test_wrong_number_of_class_folders_is_refused(tmp_path):
    write_folder(tmp_path / "GTSRB" / "test", ["00000", "00001"], 1)
    with pytest.raises(ValueError, match=r"GTSRB/test has 2 class folders but GTSRB has 43 classes"):
        load_paper_dataset("GTSRB", tmp_path, "test", None)


def test_missing_dataset_names_the_paths_and_how_to_get_it(tmp_path):
    root = tmp_path / "data"
    with pytest.raises(FileNotFoundError) as err:
        load_paper_dataset("MNIST", root, "test", None)
    msg = str(err.value)
    assert str(root / "MNIST" / "raw") in msg and str(root / "MNIST" / "test") in msg
    assert "download=True" in msg
    with pytest.raises(FileNotFoundError, match=str(root / "RESISC45" / "val")):
        load_paper_dataset("RESISC45", root, "val", None)


def test_bad_name_or_split():
    with pytest.raises(ValueError, match="unknown paper dataset 'ImageNet'"):
        load_paper_dataset("ImageNet", "data", "test", None)
    with pytest.raises(ValueError, match="unknown paper dataset 'mnist'"):
        templates("mnist")
    with pytest.raises(ValueError, match="split must be one of"):
        load_paper_dataset("MNIST", "data", "validation", None)


def test_class_name_counts_and_templates():
    counts = {"GTSRB": 43, "EuroSAT": 10, "MNIST": 10, "SVHN": 10, "RESISC45": 45, "DTD": 47}
    assert {name: len(classnames(name)) for name in counts} == counts
    assert classnames("RESISC45")[2] == "baseball diamond"
    assert classnames("DTD")[30] == "polka-dotted"
    lengths = {name: len(templates(name)) for name in PAPER_DATASETS}
    assert lengths == {"SUN397": 2, "Cars": 8, "RESISC45": 18, "EuroSAT": 3, "SVHN": 1, "GTSRB": 3,
                       "MNIST": 1, "DTD": 8}
    assert templates("MNIST")[0].format("7") == 'a photo of the number: "7".'
    assert templates("RESISC45")[0].format("beach") == "satellite imagery of beach."
    assert templates("RESISC45")[-1].format("beach") == "aerial view of the beach."
    assert templates("DTD")[5].format("woven") == "a photo of the woven pattern."
    assert all(t.count("{}") == 1 for name in PAPER_DATASETS for t in templates(name))
