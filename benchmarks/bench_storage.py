"""Task-vector storage choices: element type (fp32, bf16, fp16), codec (none, zstd, blosc)
and chunk size, measured on random ViT-B/32-shaped task vectors (size on disk, write time,
a cold read of every block, a streaming TIES merge), and the accuracy effect of 16-bit
storage on the synthetic zoo (Task Arithmetic and TIES from stores of each element type).

    python benchmarks/bench_storage.py [--tasks 4] [--workdir results/storage] [--zoo-only | --no-zoo]

The zoo part needs the demo's models and task data (``make demo`` first).
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from benchmarks.bench_scale import drop_caches, encoder_state, synthesise  # noqa: E402
from pipeline.merging.ties_merging import Ties  # noqa: E402
from pipeline.store.streaming import Reader, merge_to_memory  # noqa: E402
from pipeline.store.task_vectors import Storage, TaskVectorStore, write_task_vector  # noqa: E402

LAYOUTS = [  # dtype, codec, level, chunk MiB
    ("float32", "none", 0, 4), ("float32", "none", 0, 1), ("float32", "none", 0, 16),
    ("float32", "zstd", 3, 4), ("float32", "blosc", 5, 4),
    ("bfloat16", "none", 0, 4), ("bfloat16", "zstd", 3, 4), ("float16", "none", 0, 4),
]


def layout_rows(tasks: int, workdir: Path) -> list[dict]:
    pretrained = {k: v for k, v in encoder_state("ViT-B-32").items() if v.is_floating_point()}
    n = sum(v.numel() for v in pretrained.values())
    rows = []
    for dtype, codec, level, chunk in LAYOUTS:
        storage, root = Storage(dtype, codec, level), workdir / f"{dtype}-{codec}-{chunk}.zarr"
        start = time.perf_counter()
        store = synthesise(root, pretrained, tasks, storage, chunk)
        write_s = time.perf_counter() - start
        drop_caches()
        reader = Reader(store)
        start = time.perf_counter()
        for _ in reader.blocks():
            pass
        read_s = time.perf_counter() - start
        reader.close()
        if not rows:  # the first merge compiles the per-block CPU loops: not timed
            merge_to_memory(store, Ties(20, "mean"))
        drop_caches()
        start = time.perf_counter()
        merge_to_memory(store, Ties(20, "mean"))
        ties_s = time.perf_counter() - start
        row = {"dtype": dtype, "codec": f"{codec}-{level}" if codec != "none" else codec, "chunk_mib": chunk,
               "GB_on_disk": store.nbytes() / 1e9, "bytes_per_entry": store.nbytes() / (tasks * n),
               "write_s": write_s, "read_s": read_s, "ties_s": ties_s}
        rows.append(row)
        print(json.dumps(row), flush=True)
        shutil.rmtree(root)
    return rows


def zoo_rows(workdir: Path) -> list[dict]:
    """Accuracy (%) of Task Arithmetic (lambda 0.3) and TIES (k 20, lambda 0.3) merged from
    stores of the demo zoo's task vectors in each element type."""
    from pipeline.data.tasks import load_split
    from pipeline.evaluation import accuracy
    from pipeline.merging import registry
    from pipeline.merging.contract import Inputs, default_device
    from pipeline.zoo.store import load_clip, load_encoder_state, load_head

    zoo = yaml.safe_load((REPO / "config/config.yaml").read_text())["zoo"]
    models, data = REPO / "resources/models/synthetic", REPO / "resources/data/synthetic"
    if not (models / "pretrained.safetensors").exists():
        print("no demo zoo in resources/ (run `make demo` first): accuracy part skipped")
        return []
    clip = load_clip(zoo, models / "pretrained.safetensors")
    pre = {k: v.clone() for k, v in clip.visual.state_dict().items()}
    tests = {t: (load_head(models / f"heads/{t}.safetensors"), load_split(zoo, t, "test", data / f"{t}.npz"))
             for t in zoo["tasks"]}
    rows = []
    for dtype in ("float32", "bfloat16", "float16"):
        root = workdir / f"zoo-{dtype}.zarr"
        for t in zoo["tasks"]:
            path = models / f"finetuned/{t}.safetensors"
            write_task_vector(root, t, pre, load_encoder_state(path), path, storage=Storage(dtype))
        store = TaskVectorStore(root, zoo["tasks"])
        for method in ("task_arithmetic", "ties_merging"):
            spec = registry.method(method)
            inputs = Inputs(pre, store.tasks, store, device=default_device())
            clip.visual.load_state_dict(spec.run(inputs, spec.configure(lam=0.3)).state_dict())
            accs = {t: accuracy(clip.visual, head, split)["accuracy"] for t, (head, split) in tests.items()}
            row = {"storage": dtype, "method": method, "avg": sum(accs.values()) / len(accs), **accs}
            rows.append(row)
            print(json.dumps(row), flush=True)
        shutil.rmtree(root)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", type=int, default=4)
    p.add_argument("--workdir", type=Path, default=Path("results/storage"))
    p.add_argument("--json", type=Path)
    p.add_argument("--zoo-only", action="store_true")
    p.add_argument("--no-zoo", action="store_true")
    a = p.parse_args()
    torch.set_num_threads(2)
    a.workdir.mkdir(parents=True, exist_ok=True)
    result = {"layouts": [] if a.zoo_only else layout_rows(a.tasks, a.workdir),
              "zoo": [] if a.no_zoo else zoo_rows(a.workdir)}
    import pandas as pd

    for name, rows in result.items():
        if rows:
            print(f"\n{name}\n" + pd.DataFrame(rows).to_markdown(index=False, floatfmt=".3g"))
    if a.json:
        a.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
