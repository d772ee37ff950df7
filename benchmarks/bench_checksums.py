"""The cost of the task-vector store's chunk checksums: every block of K random task vectors
read through the streaming reader (two threads, as merges read) with the checksums verified
and with verification switched off, alternating in one process, for each storage layout.

    python benchmarks/bench_checksums.py [--tasks 4] [--mib 256] [--repeats 3] [--cold] [--workdir results/checksums]

The store is read from the page cache (where verification costs the most relative to the
read), or with ``--cold`` from disk: its files (only they) are evicted from the page cache
before each read.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import google_crc32c
import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from pipeline.store.streaming import Reader  # noqa: E402
from pipeline.store.task_vectors import Storage, TaskVectorStore, write_diffs  # noqa: E402

LAYOUTS = [Storage(), Storage("bfloat16"), Storage("float32", "zstd")]


class Unverified(TaskVectorStore):
    """The store read without checking chunk checksums."""

    def _verify(self, *args) -> None:
        pass


def write_store(root: Path, tasks: int, mib: float, storage: Storage, chunk_mib: float) -> list[str]:
    """``tasks`` task vectors of ``mib`` MiB of fp32 each, in tensors of 8 MiB; their names."""
    names = [f"t{j}" for j in range(tasks)]
    for j, name in enumerate(names):
        gen = torch.Generator().manual_seed(j)
        diffs = ((f"w{i}", torch.randn(2**21, generator=gen).mul_(1e-3), torch.float32) for i in range(int(mib / 8)))
        write_diffs(root, name, diffs, "base", f"src-{j}", chunk_mib, storage)
    return names


def evict(root: Path) -> None:
    """Drop the files under ``root`` from the page cache (written back first)."""
    for path in root.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def read_s(store: TaskVectorStore, cold: bool) -> float:
    """Seconds of one pass over every block (from disk where ``cold``)."""
    if cold:
        evict(store.root)
    reader = Reader(store)
    start = time.perf_counter()
    for _ in reader.blocks():
        pass
    reader.close()
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", type=int, default=4)
    p.add_argument("--mib", type=float, default=256, help="MiB of fp32 per task vector")
    p.add_argument("--chunk-mib", type=float, default=4)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--cold", action="store_true", help="evict the store from the page cache before each read")
    p.add_argument("--workdir", type=Path, default=Path("results/checksums"))
    a = p.parse_args()
    torch.set_num_threads(2)
    data = np.random.default_rng(0).random(2**22, dtype=np.float32)
    start = time.perf_counter()
    for _ in range(10):
        google_crc32c.value(data)
    print(json.dumps({"crc32c_GiB_per_s_one_thread": 10 * data.nbytes / 2**30 / (time.perf_counter() - start),
                      "cold": a.cold}), flush=True)
    for storage in LAYOUTS:
        root = a.workdir / f"{storage.dtype}-{storage.codec}.zarr"
        shutil.rmtree(root, ignore_errors=True)
        tasks = write_store(root, a.tasks, a.mib, storage, a.chunk_mib)
        stores = {True: TaskVectorStore(root, tasks), False: Unverified(root, tasks)}
        read_s(stores[True], a.cold)  # warm-up: first page-in
        times = {True: [], False: []}
        for _ in range(a.repeats):
            for verify, store in stores.items():
                times[verify].append(read_s(store, a.cold))
        fp32_gib = a.tasks * a.mib / 1024
        best = {v: min(t) for v, t in times.items()}
        print(json.dumps({"dtype": storage.dtype, "codec": storage.codec, "GiB_fp32": fp32_gib,
                          "GiB_on_disk": stores[True].nbytes() / 2**30, "verified_s": best[True],
                          "unverified_s": best[False],
                          "verified_fp32_GiB_per_s": fp32_gib / best[True],
                          "unverified_fp32_GiB_per_s": fp32_gib / best[False],
                          "throughput_ratio": best[False] / best[True]}), flush=True)
        shutil.rmtree(root)


if __name__ == "__main__":
    main()
