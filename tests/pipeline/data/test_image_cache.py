"""Image caches: decoded once with open_clip's eval preprocessing, read back memory-mapped
item by item, in batches and as AdaMerging's unlabeled images."""

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
from PIL import Image
from torch.utils.data import Dataset, TensorDataset

from pipeline.data.image_cache import IMAGES, LABELS, DecodedImages, UnlabeledImages, decode_split
from pipeline.data.tasks import load_split, unlabeled
from pipeline.evaluation import accuracy, batches
from pipeline.merging import adamerging as am
from pipeline.models.clip import create_model

REPO = Path(__file__).resolve().parents[3]
# (width, height, mode): wide, tall, square, tiny, odd sizes; the modes PaperSplit converts
SHAPES = [(300, 200, "RGB"), (200, 300, "L"), (640, 480, "RGBA"), (31, 57, "P"), (224, 224, "RGB"),
          (225, 224, "L"), (64, 64, "RGB"), (500, 333, "P")]


def pil_images(shapes=SHAPES, seed=0):
    """Random images of the given sizes and modes (smooth enough that resizing matters)."""
    rng = np.random.default_rng(seed)
    out = []
    for w, h, mode in shapes:
        coarse = rng.integers(0, 256, (max(h // 8, 2), max(w // 8, 2), 4), dtype=np.uint8)
        image = Image.fromarray(coarse, "RGBA").resize((w, h), Image.BILINEAR)
        out.append(image if mode == "RGBA" else image.convert(mode))
    return out


class Items(Dataset):
    """(PIL image, label) items, as load_paper_dataset gives without a transform."""

    def __init__(self, images, fail_at=None):
        self.images, self.fail_at = images, fail_at

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        if i == self.fail_at:
            raise OSError(f"image {i} is unreadable")
        return self.images[i], i % 3


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
    assert isinstance(unlabeled(cache, rows), UnlabeledImages)


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


def test_evaluation_over_the_cache_equals_evaluation_over_its_tensors(tmp_path):
    decode_split(Items(pil_images(SHAPES * 3)), 32, tmp_path / "c", threads=2)
    cache = DecodedImages(tmp_path / "c")
    tensors = TensorDataset(*cache[:])
    for (x, y), (xt, yt) in zip(batches(cache, 7), batches(tensors, 7), strict=True):
        assert torch.equal(x, xt) and torch.equal(y, yt)
    assert [len(y) for _, y in batches(cache, 7)] == [7, 7, 7, 3]
    encoder = create_model("synth-vit-tiny", seed=0).visual
    head = torch.nn.functional.normalize(torch.randn(3, 64, generator=torch.Generator().manual_seed(0)), dim=-1)
    a, b = accuracy(encoder, head, cache, 5), accuracy(encoder, head, tensors, 5)
    assert (a["accuracy"], a["n"]) == (b["accuracy"], b["n"]) and a["n"] == len(cache)


def test_adamerging_on_the_cache_equals_adamerging_on_its_tensors(tmp_path):
    decode_split(Items(pil_images(SHAPES * 4)), 32, tmp_path / "c", threads=2)
    cache = DecodedImages(tmp_path / "c")
    encoder = create_model("synth-vit-tiny", seed=0).visual
    pre = encoder.state_dict()
    g = torch.Generator().manual_seed(0)
    finetuned = [{k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in pre.items()} for _ in range(2)]
    heads = [20 * torch.nn.functional.normalize(torch.randn(3, 64, generator=g), dim=-1) for _ in range(2)]
    rows = [torch.randperm(len(cache), generator=g)[:20] for _ in range(2)]
    settings = am.Settings(steps=3, batch_size=4)
    views = [UnlabeledImages(cache, r) for r in rows]
    tensors = [cache[:][0][r] for r in rows]
    a = am.adamerge("layer_wise", encoder, finetuned, heads, views, settings, device="cpu", progress=False)
    b = am.adamerge("layer_wise", encoder, finetuned, heads, tensors, settings, device="cpu", progress=False)
    assert a.entropy == b.entropy and torch.equal(a.lambdas, b.lambdas)


def test_load_split_reads_a_real_tasks_split_from_its_cache(tmp_path):
    decode_split(Items(pil_images()), 32, tmp_path / "EuroSAT" / "val", threads=1)
    zoo = {"source": "open_clip", "arch": "synth-vit-tiny", "data_root": str(tmp_path / "raw")}
    split = load_split(zoo, "EuroSAT", "val", tmp_path / "EuroSAT")
    assert isinstance(split, DecodedImages) and len(split) == len(SHAPES)
    with pytest.raises(FileNotFoundError, match="EuroSAT/test"):
        load_split(zoo, "EuroSAT", "test", tmp_path / "EuroSAT")
    with pytest.raises(ValueError, match="32px images but ViT-B-32 takes 224px"):
        load_split({**zoo, "arch": "ViT-B-32"}, "EuroSAT", "val", tmp_path / "EuroSAT")
