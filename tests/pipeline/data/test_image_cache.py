"""Image caches: decoded once with open_clip's eval preprocessing, read back memory-mapped
item by item, in batches and as AdaMerging's unlabeled images, with a flat resident set."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from helpers.images import SHAPES, Items, pil_images
from PIL import Image

from pipeline.data.image_cache import IMAGES, LABELS, DecodedImages, UnlabeledImages, decode_split

REPO = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    out = tmp_path_factory.mktemp("cache") / "test"
    decode_split(Items(pil_images()), 224, out, threads=2)
    return DecodedImages(out)


@pytest.mark.parametrize("size", [32, 224])
def test_cached_images_equal_open_clip_eval_transform_exactly(tmp_path, size):
    images = pil_images()
    decode_split(Items(images), size, tmp_path / "c", threads=2)
    cache = DecodedImages(tmp_path / "c")
    transform = open_clip.image_transform(size, is_train=False)
    for i, image in enumerate(images):
        x, y = cache[i]
        assert x.dtype == torch.float32 and x.shape == (3, size, size) and y == i % 3
        assert torch.equal(x, transform(image.convert("RGB")))  # the path of PaperSplit
        if image.mode in ("RGB", "L"):  # converting before or after the resize is the same
            assert torch.equal(x, transform(image))


def test_round_trip_layout_labels_and_indices(cache):
    n = len(SHAPES)
    assert len(cache) == n and cache.image_size == 224
    assert cache.images.dtype == np.uint8 and cache.images.shape == (n, 3, 224, 224)
    assert torch.equal(cache.labels, torch.arange(n) % 3) and cache.labels.dtype == torch.int64
    assert np.array_equal(cache.indices, np.arange(n))
    assert not cache.images.flags.writeable
    assert torch.equal(cache[-1][0], cache[n - 1][0])
    with pytest.raises(IndexError):
        cache[n]


def test_batched_indexing_equals_per_item_indexing(cache):
    idx = torch.tensor([5, 0, 3, 3, 7])
    x, y = cache[idx]
    assert torch.equal(x, torch.stack([cache[int(i)][0] for i in idx]))
    assert torch.equal(y, torch.tensor([cache[int(i)][1] for i in idx]))
    assert torch.equal(cache.batch(idx.numpy()), x) and torch.equal(cache.batch(idx.tolist()), x)
    xs, ys = cache[2:6]
    assert torch.equal(xs, torch.stack([cache[i][0] for i in range(2, 6)])) and torch.equal(ys, cache.labels[2:6])
    rows = torch.tensor([6, 1, 4])
    view = UnlabeledImages(cache, rows)
    assert len(view) == 3 and torch.equal(view[torch.tensor([2, 0])], cache[torch.tensor([4, 6])][0])
    assert len(UnlabeledImages(cache)) == len(cache)


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc/self/status")
def test_reading_the_whole_cache_leaves_the_resident_set_flat(tmp_path):
    def rss_file_kib():
        status = Path("/proc/self/status").read_text().splitlines()
        return next(int(line.split()[1]) for line in status if line.startswith("RssFile:"))

    images = [Image.new("RGB", (64, 64), (i % 256, i // 256, 7)) for i in range(1500)]  # 18 MB cached
    decode_split(Items(images), 64, tmp_path / "c", threads=2)
    cache = DecodedImages(tmp_path / "c")
    before = rss_file_kib()
    for s in range(0, len(cache), 100):
        cache[s : s + 100]
    view = UnlabeledImages(cache)
    for _ in range(20):
        view[torch.randperm(len(cache))[:100]]
    assert rss_file_kib() - before < 4096  # KiB; without dropping the pages: ~18000


def test_max_images_keeps_a_reproducible_seeded_subset(tmp_path, cache):
    items = Items(pil_images())
    for name, seed in [("a", 1), ("b", 1), ("c", 2)]:
        decode_split(items, 224, tmp_path / name, threads=2, max_images=4, seed=seed)
    a, b, c = (DecodedImages(tmp_path / n) for n in "abc")
    assert len(a) == 4 and np.array_equal(a.indices, b.indices) and not np.array_equal(a.indices, c.indices)
    assert np.all(np.diff(a.indices) > 0)  # source order
    assert np.array_equal(a.images, cache.images[a.indices])
    assert torch.equal(a.labels, cache.labels[a.indices])
    decode_split(items, 224, tmp_path / "all", threads=1, max_images=len(items))
    assert len(DecodedImages(tmp_path / "all")) == len(items)


def test_missing_truncated_and_inconsistent_caches_are_refused_naming_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"{tmp_path / 'none'}.*missing"):
        DecodedImages(tmp_path / "none")
    decode_split(Items(pil_images()[:4]), 32, tmp_path / "c", threads=1)
    images = tmp_path / "c" / IMAGES
    full = images.read_bytes()
    images.write_bytes(full[: len(full) - 100])
    with pytest.raises(ValueError, match=f"{tmp_path / 'c'}.*truncated"):
        DecodedImages(tmp_path / "c")
    images.write_bytes(full)
    np.save(tmp_path / "c" / LABELS, np.zeros(3, np.int64))
    with pytest.raises(ValueError, match=f"{tmp_path / 'c'}.*inconsistent"):
        DecodedImages(tmp_path / "c")


def test_a_failed_write_leaves_no_cache_nor_temporary_folder(tmp_path):
    with pytest.raises(OSError, match="image 5 is unreadable"):
        decode_split(Items(pil_images(), fail_at=5), 64, tmp_path / "test", threads=2)
    assert list(tmp_path.iterdir()) == []


def test_a_killed_write_leaves_no_cache(tmp_path):
    script = f"""
import sys, time
sys.path.insert(0, {str(REPO)!r})
from PIL import Image
from pipeline.data.image_cache import decode_split

class Slow:
    def __len__(self):
        return 1000
    def __getitem__(self, i):
        time.sleep(0.01)
        return Image.new("RGB", (40, 30), (i % 256, 0, 0)), 0

decode_split(Slow(), 32, {str(tmp_path / 'test')!r}, threads=1)
"""
    proc = subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while not any(tmp_path.glob(f".test.*.tmp/{IMAGES}")):  # writing has begun
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert not (tmp_path / "test").exists()
