"""Image caches against decoding every time: decode time, evaluation throughput and the
memory of AdaMerging's batch sampling.

1. Builds JPEG test sets of the paper's sizes in the folder layout ``root/<name>/test/<class>/``
   in a temporary folder: EuroSAT-like (2,700 images of 64x64, 10 classes) and DTD-like (1,880
   images of 300..640 px a side, 47 classes).
2. Per set: the seconds of ``decode_split`` (``--threads`` threads) and the evaluation
   throughput (images/s) of a tiny encoder (one patch convolution, the data path dominates)
   through ``pipeline.evaluation.accuracy``, over the decoded cache and over the
   decode-every-time path (``load_paper_dataset`` with open_clip's eval transform, as
   ``load_split`` without a cache), in this process; the two accuracies must agree.
3. Per ``--rss-images`` N, in a fresh process each: ``--tasks`` caches of N random images,
   then ``--steps`` AdaMerging steps of ``draw_batches`` (two batches of 16 per task) over
   ``UnlabeledImages`` views; peak RSS (VmHWM, mapped file pages included: ``getrusage``'s
   ru_maxrss survives exec, so a spawned child would report its parent's), peak anonymous RSS
   (sampled each step) and the float tensors the old ``as_tensors`` path held.

Evaluation runs with ``--torch-threads`` (default 1): on a shared machine more OpenMP threads
slow the per-image ToTensor/Normalize of the decode-every-time path several-fold.

    .venv/bin/python benchmarks/bench_image_cache.py                       # ~2-3 min on 2 cores
    .venv/bin/python benchmarks/bench_image_cache.py --eurosat 27000 --dtd 1880 --rss-images 1000 10000 30000
"""
from __future__ import annotations

import argparse
import multiprocessing
import shutil
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pipeline.data.image_cache import DecodedImages, UnlabeledImages, decode_split
from pipeline.data.paper_datasets import classnames, load_paper_dataset
from pipeline.evaluation import accuracy
from pipeline.merging.adamerging import draw_batches


def write_jpegs(root: Path, name: str, n: int, sides: tuple[int, int], threads: int, seed: int = 0) -> None:
    """``n`` JPEGs (quality 90) of random sizes in ``sides`` under ``root/name/test/<class>/``:
    smooth random colour fields with fine noise, about as compressible as photos."""
    classes = classnames(name)
    rng = np.random.default_rng(seed)
    shapes = rng.integers(sides[0], sides[1] + 1, (n, 2))
    for c in range(len(classes)):
        (root / name / "test" / f"{c:02d}").mkdir(parents=True, exist_ok=True)

    def write(i: int) -> None:
        r = np.random.default_rng((seed, i))
        h, w = (int(s) for s in shapes[i])
        coarse = Image.fromarray(r.integers(0, 256, (h // 16 + 2, w // 16 + 2, 3), dtype=np.uint8))
        pixels = np.asarray(coarse.resize((w, h), Image.BICUBIC), np.int16) + r.integers(-12, 13, (h, w, 3))
        Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(
            root / name / "test" / f"{i % len(classes):02d}" / f"{i}.jpg", quality=90)

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(write, range(n)))


def tiny_encoder(image_size: int) -> nn.Module:
    torch.manual_seed(0)
    patch = 32 if image_size % 32 == 0 else image_size
    return nn.Sequential(nn.Conv2d(3, 64, patch, stride=patch), nn.AdaptiveAvgPool2d(1), nn.Flatten()).eval()


def eval_rows(root: Path, sets: dict[str, tuple[int, tuple[int, int]]], size: int, threads: int,
              batch_size: int) -> None:
    import open_clip

    encoder = tiny_encoder(size)
    for name, (n, sides) in sets.items():
        if n <= 0:
            continue
        t = time.perf_counter()
        write_jpegs(root, name, n, sides, threads)
        mb = sum(f.stat().st_size for f in (root / name).rglob("*.jpg")) / 2**20
        print(f"\n{name}: {n} JPEGs of {sides[0]}..{sides[1]} px ({mb:.0f} MiB) written in "
              f"{time.perf_counter() - t:.1f} s", flush=True)
        head = torch.nn.functional.normalize(torch.randn(len(classnames(name)), 64), dim=-1)
        t = time.perf_counter()
        decode_split(load_paper_dataset(name, root, "test", None), size, root / "cache" / name, threads)
        decode_s = time.perf_counter() - t
        cached = accuracy(encoder, head, DecodedImages(root / "cache" / name), batch_size)
        tv = accuracy(encoder, head, load_paper_dataset(
            name, root, "test", open_clip.image_transform(size, is_train=False)), batch_size)
        assert cached["accuracy"] == tv["accuracy"] and cached["n"] == tv["n"] == n, (cached, tv)
        saved = tv["seconds"] - cached["seconds"]
        print(f"  decode once ({threads} threads): {decode_s:.1f} s ({n / decode_s:.0f} images/s)\n"
              f"  evaluation over the cache:        {n / cached['seconds']:8.0f} images/s ({cached['seconds']:.2f} s)\n"
              f"  evaluation decoding every time:   {n / tv['seconds']:8.0f} images/s ({tv['seconds']:.2f} s)\n"
              f"  ratio cache / decode-every-time:  {tv['seconds'] / cached['seconds']:8.1f}x; the cache pays "
              f"for its decoding after {decode_s / saved:.1f} evaluations", flush=True)


class Noise:
    """``n`` random (PIL image, label) items of ``size`` px: a cache is built without JPEGs."""

    def __init__(self, n: int, size: int, seed: int):
        self.n, self.size, self.seed = n, size, seed

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        pixels = np.random.default_rng((self.seed, i)).integers(0, 256, (self.size, self.size, 3), dtype=np.uint8)
        return Image.fromarray(pixels), 0


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field + ":"))


def sampling_rss(caches: list[str], steps: int) -> dict[str, float]:
    """(Run in a fresh process.) Peak RSS of ``steps`` AdaMerging draws over the caches."""
    torch.set_num_threads(1)
    views = [UnlabeledImages(DecodedImages(c)) for c in caches]
    generator = torch.Generator().manual_seed(0)
    before = _status_kib("RssAnon")
    peak_anon = before
    t = time.perf_counter()
    for _ in range(steps):
        x, _ = draw_batches(views, 16, 2, generator)
        peak_anon = max(peak_anon, _status_kib("RssAnon"))
    return {"step_ms": 1000 * (time.perf_counter() - t) / steps,
            "peak_rss_mib": _status_kib("VmHWM") / 1024,
            "peak_anon_mib": peak_anon / 1024, "anon_before_mib": before / 1024,
            "file_mib": _status_kib("RssFile") / 1024}


def rss_rows(root: Path, counts: list[int], tasks: int, size: int, steps: int, threads: int) -> None:
    print(f"\nAdaMerging sampling, {tasks} tasks x N images of {size} px, {steps} steps of 2 x 16 per task "
          "(a fresh process per N)")
    spawn = multiprocessing.get_context("spawn")
    rows = []
    for n in counts:
        caches = [root / "rss" / f"n{n}-t{k}" for k in range(tasks)]
        for k, cache in enumerate(caches):
            decode_split(Noise(n, size, seed=k), size, cache, threads)
        with ProcessPoolExecutor(1, mp_context=spawn) as pool:
            row = pool.submit(sampling_rss, [str(c) for c in caches], steps).result()
        row["as_tensors_mib"] = tasks * n * 3 * size * size * 4 / 2**20
        rows.append((n, row))
        print(f"  N={n:6d}: peak RSS {row['peak_rss_mib']:5.0f} MiB (file-backed at the end: {row['file_mib']:.0f}, "
              f"libraries and cache pages), anonymous {row['anon_before_mib']:.0f} -> peak "
              f"{row['peak_anon_mib']:.0f} MiB; {row['step_ms']:.1f} ms a step; as_tensors held "
              f"{row['as_tensors_mib']:.0f} MiB", flush=True)
        shutil.rmtree(root / "rss")
    (n0, a), (n1, b) = rows[0], rows[-1]
    print(f"  {n1 / n0:g}x the images: peak RSS x{b['peak_rss_mib'] / a['peak_rss_mib']:.2f}, peak anonymous "
          f"RSS x{b['peak_anon_mib'] / a['peak_anon_mib']:.2f}, as_tensors x{b['as_tensors_mib'] / a['as_tensors_mib']:g}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--eurosat", type=int, default=2700, help="EuroSAT-like images (64x64); 0: skip")
    p.add_argument("--dtd", type=int, default=1880, help="DTD-like images (300..640 px); 0: skip")
    p.add_argument("--size", type=int, default=224, help="the encoder's input size")
    p.add_argument("--threads", type=int, default=2, help="decoding threads")
    p.add_argument("--torch-threads", type=int, default=1, help="torch threads of the evaluation")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--rss-images", type=int, nargs="*", default=[1000, 10000], help="images per task; none: skip")
    p.add_argument("--tasks", type=int, default=2)
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--workdir", type=Path, help="default: a temporary folder, removed at the end")
    a = p.parse_args()
    torch.set_num_threads(a.torch_threads)
    with tempfile.TemporaryDirectory(dir=a.workdir) as tmp:
        root = Path(tmp)
        eval_rows(root, {"EuroSAT": (a.eurosat, (64, 64)), "DTD": (a.dtd, (300, 640))}, a.size, a.threads,
                  a.batch_size)
        if a.rss_images:
            rss_rows(root, a.rss_images, a.tasks, a.size, a.steps, a.threads)


if __name__ == "__main__":
    main()
