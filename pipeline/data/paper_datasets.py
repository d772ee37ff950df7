"""The AdaMerging paper's 8 datasets (suite TA8) read through torchvision or from local image
folders, with the class names and prompt templates of pipeline.data.suites (the task_vectors
ones for these tasks).

Sources, tried in this order under ``root``:

1. torchvision's own files (``download=False``): ``SUN397/``, ``stanford_cars/``,
   ``eurosat/``, ``svhn/``, ``gtsrb/``, ``MNIST/``, ``dtd/`` (none for RESISC45);
2. the folder layout ``root/<name>/<split>/<class>/<image>`` (classes in sorted folder
   order; for datasets with fixed class names the folders must sort like the originals,
   e.g. ``00000``..``00042`` for GTSRB, ``0``..``9`` for MNIST/SVHN).

Splits are ``train``, ``val`` and ``test``. Where a source has no validation split, it is
carved from train as in the task_vectors code (a seeded random 10%, at most 5000 images;
seed 0) and ``train`` is the rest. SUN397 and EuroSAT in torchvision have no splits at all:
their ``test`` is carved first from the whole set the same way.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torchvision.datasets as tvd
from torch.utils.data import Dataset, random_split

from pipeline.data.suites import SUITES, task

PAPER_DATASETS = SUITES["TA8"]
SPLITS = ("train", "val", "test")
VAL_FRACTION, MAX_VAL, SPLIT_SEED = 0.1, 5000, 0

# Their label order depends on the source (torchvision's files, class folders), so their names
# come from the data; suites holds the Hub's order.
_NAMES_FROM_DATA = ("SUN397", "Cars")


@dataclass(frozen=True)
class _Torchvision:
    markers: dict[str | None, str]  # split -> path under root that exists when its files do
    build: Callable[[Path, str | None], Any]  # (root, split or None for the undivided set)
    how: str  # how to obtain the files, {root} filled in

    @property
    def splits(self) -> tuple[str, ...]:
        """The splits torchvision provides; () means one undivided set."""
        return tuple(s for s in self.markers if s is not None)


_TORCHVISION: dict[str, _Torchvision] = {
    "SUN397": _Torchvision(
        {None: "SUN397/ClassName.txt"},
        lambda r, s: tvd.SUN397(r),
        "run torchvision.datasets.SUN397('{root}', download=True) once online,",
    ),
    "Cars": _Torchvision(
        {"train": "stanford_cars/cars_train", "test": "stanford_cars/cars_test"},
        lambda r, s: tvd.StanfordCars(r, split=s),
        "get the Stanford Cars files (devkit/, cars_train/, cars_test/, "
        "cars_test_annos_withlabels.mat; torchvision cannot download them any more, they are "
        "mirrored on Kaggle) into {root}/stanford_cars/,",
    ),
    "EuroSAT": _Torchvision(
        {None: "eurosat/2750"},
        lambda r, s: tvd.EuroSAT(r),
        "run torchvision.datasets.EuroSAT('{root}', download=True) once online,",
    ),
    "SVHN": _Torchvision(
        {s: f"svhn/{s}_32x32.mat" for s in ("train", "test")},
        lambda r, s: tvd.SVHN(r / "svhn", split=s),
        "run torchvision.datasets.SVHN('{root}/svhn', split=..., download=True) once online "
        "for 'train' and 'test',",
    ),
    "GTSRB": _Torchvision(
        {"train": "gtsrb/GTSRB/Training", "test": "gtsrb/GTSRB/Final_Test/Images"},
        lambda r, s: tvd.GTSRB(r, split=s),
        "run torchvision.datasets.GTSRB('{root}', split=..., download=True) once online for "
        "'train' and 'test',",
    ),
    "MNIST": _Torchvision(
        {"train": "MNIST/raw/train-images-idx3-ubyte", "test": "MNIST/raw/t10k-images-idx3-ubyte"},
        lambda r, s: tvd.MNIST(r, train=s == "train"),
        "run torchvision.datasets.MNIST('{root}', train=..., download=True) once online for "
        "train=True and train=False,",
    ),
    "DTD": _Torchvision(
        {s: "dtd/dtd/labels" for s in SPLITS},
        lambda r, s: tvd.DTD(r, split=s, partition=1),
        "run torchvision.datasets.DTD('{root}', split=..., download=True) once online,",
    ),
}


class PaperSplit(Dataset):
    """One split of a paper dataset: ``(transform(RGB image), label)`` items and
    ``classnames``, the clean class names in label order."""

    def __init__(
        self,
        base: Dataset,
        indices: Sequence[int],
        classnames: list[str],
        transform: Callable | None,
    ):
        self.base, self.indices, self.classnames, self.transform = base, indices, classnames, transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[Any, int]:
        image, label = self.base[self.indices[i]]
        image = image.convert("RGB")
        return (self.transform(image) if self.transform else image), int(label)


def templates(name: str) -> list[str]:
    """The prompt templates of dataset ``name`` (``str.format`` with the class)."""
    _check_name(name)
    return list(task(name).templates)


def classnames(name: str, root: str | Path | None = None) -> list[str]:
    """Clean class names of dataset ``name`` in label order. SUN397 and Cars read theirs from
    the data under ``root`` (their label order depends on the source)."""
    _check_name(name)
    if name not in _NAMES_FROM_DATA:
        return list(task(name).classnames)
    if root is None:
        raise ValueError(f"{name}'s class names come from its data: pass the data root")
    return load_paper_dataset(name, root, "test", None).classnames


def load_paper_dataset(
    name: str, root: str | Path, split: str, transform: Callable | None
) -> PaperSplit:
    """The ``split`` (train/val/test) of paper dataset ``name`` found under ``root`` (see the
    module docstring for the sources and the carved splits)."""
    _check_name(name)
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    root = Path(root).expanduser()
    tv = _TORCHVISION.get(name)
    looked = []
    if tv is not None:
        native = split if split in tv.splits else ("train" if tv.splits else None)
        marker = root / tv.markers[native]
        if marker.exists():
            return _select(name, split, tv.splits, lambda s: tv.build(root, s), transform)
        looked.append(f"torchvision's files at {marker}")
    folder = root / name
    present = tuple(s for s in SPLITS if (folder / s).is_dir())
    if split in present or (split in ("train", "val") and "train" in present):
        return _select(name, split, present, lambda s: _image_folder(name, folder / s), transform)
    carve_from = f" (or {folder / 'train'} to carve it from)" if split == "val" else ""
    looked.append(f"the folder layout {folder / split}/<class>/<image>{carve_from}")
    how = (
        f"{tv.how.format(root=root)} or put"
        if tv
        else "download NWPU-RESISC45 (torchgeo's train/val/test lists are the task_vectors "
        "splits) and put"
    )
    raise FileNotFoundError(
        f"dataset {name} ({split}) not found: looked for {' and for '.join(looked)}. To get it, "
        f"{how} the images in {folder}/{{train,val,test}}/<class>/ (val is optional: it is "
        "carved from train)"
    )


def _check_name(name: str) -> None:
    if name not in PAPER_DATASETS:
        raise ValueError(f"unknown paper dataset {name!r}; known: {', '.join(PAPER_DATASETS)}")


def hold_out(n: int) -> tuple[list[int], list[int]]:
    """``(kept, held)`` indices of ``n`` items: ``held`` is a seeded random 10% (at most 5000),
    the split the task_vectors code uses for its validation sets."""
    held = min(int(n * VAL_FRACTION), MAX_VAL)
    if held == 0:
        raise ValueError(f"{n} images are too few to carve a held-out split from")
    kept_set, held_set = random_split(
        range(n), [n - held, held], generator=torch.Generator().manual_seed(SPLIT_SEED)
    )
    return list(kept_set.indices), list(held_set.indices)


def _select(
    name: str,
    split: str,
    present: Sequence[str],
    build: Callable[[str | None], Any],
    transform: Callable | None,
) -> PaperSplit:
    """``split`` from a source providing the splits ``present`` (none: one undivided set)."""
    if not present:  # carve test from the whole set, then val from the rest
        base = build(None)
        rest, test = hold_out(len(base))
        indices = test if split == "test" else rest
    elif split == "test" or "val" in present:
        base = build(split)
        indices = list(range(len(base)))
    else:
        base = build("train")
        indices = list(range(len(base)))
    if split != "test" and "val" not in present:
        train, val = hold_out(len(indices))
        indices = [indices[i] for i in (val if split == "val" else train)]
    return PaperSplit(base, indices, _names_of(name, base), transform)


def _image_folder(name: str, path: Path) -> tvd.ImageFolder:
    data = tvd.ImageFolder(str(path))
    expected = len(task(name).classnames)
    if name not in _NAMES_FROM_DATA and len(data.classes) != expected:
        raise ValueError(
            f"{path} has {len(data.classes)} class folders but {name} has {expected} "
            "classes; every class needs its own folder"
        )
    return data


def _names_of(name: str, base: Any) -> list[str]:
    """Clean class names in the label order of ``base``, cleaned as the task_vectors code
    does: SUN397 ``/a/abbey`` or ``a_abbey`` -> ``abbey``, underscores to spaces."""
    if name not in _NAMES_FROM_DATA:
        return list(task(name).classnames)
    names = list(base.classes)
    if name == "SUN397":
        names = [re.sub(r"^/?([a-z])[/_](?=\1)", "", c).replace("/", " ") for c in names]
    return [c.replace("_", " ") for c in names]
