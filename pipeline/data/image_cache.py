"""Image caches: a split decoded once (open_clip's eval resize and crop) into uint8 arrays on
disk, read back memory-mapped, so that evaluating or sampling a split neither decodes its
images again nor holds them all in memory. The mapped pages are dropped from the process
after every chunk written and every batch read (``madvise(MADV_DONTNEED)``; the kernel's page
cache keeps them): the resident set stays flat in the split's size, also as Slurm's
accounting counts it (mapped file pages included).

A cache is one folder (written under a temporary name and renamed when complete):

    images.npy   uint8 (N, 3, S, S), RGB, resized and cropped, not normalised
    labels.npy   int64 (N,)
    indices.npy  int64 (N,): the source dataset's index of each row (ascending)
    meta.json    image_size S, the normalisation mean and std, source_images, max_images, seed

One folder per split keeps a single output path per workflow rule, and the normalisation
travels with the pixels it belongs to.
"""

from __future__ import annotations

import json
import mmap
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm import tqdm

from pipeline.data.synthetic import normalise
from pipeline.io import atomic_path

IMAGES, LABELS, INDICES, META = "images.npy", "labels.npy", "indices.npy", "meta.json"
_CHUNK = 1024  # images handed to the thread pool at a time: bounds the pending futures

Index = int | slice | Sequence[int] | np.ndarray | torch.Tensor


def _mapped(path: Path, writable: bool = False) -> tuple[mmap.mmap, np.ndarray]:
    """The array of the .npy file ``path`` over a mapping of our own (so that :func:`_release`
    can drop its pages); ``np.load`` checks the header and the file's length first."""
    header = np.load(path, mmap_mode="r")
    with open(path, "r+b" if writable else "rb") as f:
        mapping = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_WRITE if writable else mmap.ACCESS_READ)
    return mapping, np.frombuffer(mapping, header.dtype, header.size, header.offset).reshape(header.shape)


def _release(mapping: mmap.mmap) -> None:
    """Drop the mapping's pages from the resident set (written ones stay dirty in the page cache)."""
    if hasattr(mmap, "MADV_DONTNEED"):
        mapping.madvise(mmap.MADV_DONTNEED)


def eval_preprocessing(image_size: int):
    """(resize and crop, normalize) of ``open_clip.image_transform(image_size, is_train=False)``:
    its PIL transforms before ToTensor, and its Normalize."""
    import open_clip
    from torchvision.transforms import Compose, Normalize, ToTensor

    steps = open_clip.image_transform(image_size, is_train=False).transforms
    cut = next(i for i, t in enumerate(steps) if isinstance(t, ToTensor))
    normalize = steps[-1]
    if not isinstance(normalize, Normalize):
        raise TypeError(f"open_clip's eval transform no longer ends with Normalize: {steps}")
    return Compose(steps[:cut]), normalize


def decode_split(dataset: Dataset, image_size: int, out: str | Path, threads: int, max_images: int = 0,
                 seed: int = 0) -> None:
    """Decode the (PIL image, label) items of ``dataset`` into the cache folder ``out``:
    converted to RGB (as :class:`~pipeline.data.paper_datasets.PaperSplit` does), then open_clip's
    eval resize (shorter side to ``image_size``, bicubic) and center crop, with ``threads``
    threads, each image written into the memory-mapped array as it is decoded.
    ``max_images > 0`` keeps a seeded random subset of that many images (in source order)."""
    n_source = len(dataset)
    if 0 < max_images < n_source:
        indices = np.sort(np.random.default_rng(seed).choice(n_source, max_images, replace=False))
    else:
        indices = np.arange(n_source)
    geometry, normalize = eval_preprocessing(image_size)
    with atomic_path(out, directory=True) as tmp:
        np.lib.format.open_memmap(tmp / IMAGES, mode="w+", dtype=np.uint8,
                                  shape=(len(indices), 3, image_size, image_size))  # header and length
        mapping, images = _mapped(tmp / IMAGES, writable=True)
        labels = np.empty(len(indices), np.int64)

        def decode(row: int) -> None:
            image, label = dataset[int(indices[row])]
            images[row] = np.asarray(geometry(image.convert("RGB"))).transpose(2, 0, 1)
            labels[row] = label

        with ThreadPoolExecutor(max(1, threads)) as pool, \
                tqdm(total=len(indices), desc=f"decoding {out}", unit="img", mininterval=2) as bar:
            for start in range(0, len(indices), _CHUNK):
                for _ in pool.map(decode, range(start, min(start + _CHUNK, len(indices)))):
                    bar.update()
                _release(mapping)
        mapping.flush()
        np.save(tmp / LABELS, labels)
        np.save(tmp / INDICES, indices)
        (tmp / META).write_text(json.dumps({
            "image_size": image_size, "mean": list(normalize.mean), "std": list(normalize.std),
            "source_images": n_source, "max_images": max_images, "seed": seed,
        }, indent=2))


class DecodedImages(Dataset):
    """A cache folder written by :func:`decode_split`, memory-mapped read-only: items are
    (normalised float32 (3, S, S) image, label), exactly what open_clip's eval transform gives
    for the source image; a slice or 1-D index array/tensor gives a (B, 3, S, S) batch and its
    labels, read from those rows only. ``images`` is the raw uint8 array, ``indices`` the
    source dataset's index of each row."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        missing = [name for name in (IMAGES, LABELS, INDICES, META) if not (self.path / name).is_file()]
        if missing:
            raise FileNotFoundError(
                f"image cache {self.path} is missing {', '.join(missing)}; it is written by "
                "`python -m pipeline decode-images` (the workflow's image rule)"
            )
        try:
            self._mapping, self.images = _mapped(self.path / IMAGES)
            self._labels = torch.from_numpy(np.load(self.path / LABELS))
            self.indices = np.load(self.path / INDICES)
        except ValueError as err:  # a file shorter than its header says
            raise ValueError(f"image cache {self.path} is truncated or corrupt: {err}") from None
        meta = json.loads((self.path / META).read_text())
        self.image_size = int(meta["image_size"])
        expected = (len(self._labels), 3, self.image_size, self.image_size)
        if self.images.shape != expected or len(self.indices) != len(self._labels):
            raise ValueError(f"image cache {self.path} is truncated or inconsistent: images "
                             f"{self.images.shape}, {len(self._labels)} labels, {len(self.indices)} "
                             f"indices, image size {self.image_size}")
        self.mean = torch.tensor(meta["mean"], dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(meta["std"], dtype=torch.float32).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self._labels)

    @property
    def labels(self) -> torch.Tensor:
        """(N,) int64 labels."""
        return self._labels

    def batch(self, index: slice | Sequence[int] | np.ndarray | torch.Tensor) -> torch.Tensor:
        """The normalised images of rows ``index`` (a slice reads one contiguous block), (B, 3, S, S)."""
        if torch.is_tensor(index):
            index = index.numpy()
        rows = np.require(self.images[index], requirements="W")  # fancy indexing copies, a slice is a view
        _release(self._mapping)
        return normalise(torch.from_numpy(rows), self.mean, self.std)

    def __getitem__(self, index: Index) -> tuple[torch.Tensor, int] | tuple[torch.Tensor, torch.Tensor]:
        if isinstance(index, slice):
            return self.batch(index), self._labels[index]
        index = torch.as_tensor(index)
        if index.ndim == 0:
            i = range(len(self))[int(index)]  # IndexError past the end, as Dataset iteration expects
            return self.batch(slice(i, i + 1))[0], int(self._labels[i])
        return self.batch(index), self._labels[index]


class UnlabeledImages:
    """The images of a :class:`DecodedImages` (only ``rows``, in that order, when given) for
    AdaMerging: ``len()`` and indexing by a 1-D LongTensor -> normalised float (B, 3, S, S),
    read from the sampled rows of the memory map only."""

    def __init__(self, images: DecodedImages, rows: torch.Tensor | None = None):
        self.images, self.rows = images, rows

    def __len__(self) -> int:
        return len(self.images) if self.rows is None else len(self.rows)

    def __getitem__(self, index: torch.Tensor) -> torch.Tensor:
        return self.images.batch(index if self.rows is None else self.rows[index])
