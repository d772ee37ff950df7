"""The real-zoo workflow on this machine, with FusionBench's ViT-B/32 suite layout served by
the local stand-in Hub (random weights of the real shapes: a transformers CLIPModel of
openai/clip-vit-base-patch32's config and CLIPVisionModel fine-tuned encoders; JPEG parquet
test sets of the real sizes of 2 tasks: EuroSAT 2,700 images of 64 px and DTD 1,880 of
300..640 px).

1. Stages: the workflow from download to the evaluations of the zero-shot model, Task
   Arithmetic (lambda searched on validation) and AdaMerging (task-wise, ``--steps`` steps):
   seconds and peak RSS of every job from Snakemake's benchmark files, per rule.
2. Memory flat in the test-set size: the AdaMerging and evaluation jobs again with
   ``--rss-images`` images per task (64 px JPEGs), peak RSS of each and the ratio to the
   smallest size.
3. Evaluation throughput (images/s), in this process on ``--device``: the ViT-B/32 encoder
   over the decoded cache of DTD's test set against decoding every time from its parquet files
   (``ParquetSplit`` + open_clip's eval transform), and the data path alone (no model).

    .venv/bin/python benchmarks/bench_real_zoo.py                 # ~25 min on 2 cores
    .venv/bin/python benchmarks/bench_real_zoo.py --device cuda --only throughput   # benchmarks/gpu.sh
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from helpers.hub_server import HubServer  # noqa: E402  (the stand-in Hub of the tests)
from helpers.hub_zoo import write_dataset_repos, write_model_repos  # noqa: E402

TASKS = ["EuroSAT", "DTD"]
REAL_SIZES = {"EuroSAT": 2700, "DTD": 1880}
IMAGE_SIDES = {"EuroSAT": (64, 64), "DTD": (300, 640)}
PRETRAINED = "openai/clip-vit-base-patch32"
FINETUNED = "tanganke/clip-vit-base-patch32_{hub_name}"


def config(name: str, steps: int, threads: int) -> dict:
    return {
        "zoo": {"name": name, "source": "open_clip", "arch": "ViT-B-32-quickgelu", "tasks": TASKS,
                "pretrained": {"repo": PRETRAINED}, "checkpoints": {"repo": FINETUNED},
                "datasets": {"source": "hub"}, "images": {"workers": threads}},
        "evaluation": {"batch_size": 128},
        "threads": threads,
        "merging": {"adamerging": {"steps": steps, "gpus": 0}},
        "analysis": {k: {"enabled": False} for k in
                     ("sensitivity", "coefficients", "distances", "surrogate", "robustness", "unseen", "pem")},
    }


def targets(name: str) -> list[str]:
    return [f"results/{name}/eval/{m}.parquet" for m in ("zeroshot", "task_arithmetic", "adamerging_task_wise")]


def build_hub(root: Path, test_sizes: dict[str, int], sides: dict[str, tuple[int, int]], models: Path | None) -> None:
    """The suite's repos under ``root`` (model repos copied from ``models`` when given)."""
    if models is None:
        write_model_repos(root, TASKS, full_size=True, pretrained_repo=PRETRAINED, finetuned_repo=FINETUNED)
    else:
        shutil.copytree(models, root / "models")
    for task in TASKS:
        write_dataset_repos(root, [task], {"train": 300, "test": test_sizes[task]}, image_sizes={task: sides[task]},
                            fmt="JPEG")


def run_workflow(work: Path, hub_root: Path, name: str, cfg: dict, cores: int, goals: list[str]) -> float:
    work.mkdir(parents=True, exist_ok=True)
    (work / f"{name}.yaml").write_text(yaml.safe_dump(cfg))
    start = time.perf_counter()
    with HubServer(hub_root) as hub:
        env = {**os.environ, **hub.env(work / "hf_cache")}
        cmd = [str(Path(sys.executable).parent / "snakemake"), "-s", str(ROOT / "Snakefile"), "-d", str(work), *goals,
               "--cores", str(cores), "--configfile", f"{name}.yaml"]  # --configfile takes every value after it
        proc = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"workflow failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return time.perf_counter() - start


def stage_table(work: Path, name: str) -> pd.DataFrame:
    """Per rule: jobs, seconds (sum) and peak RSS (max, MB) of Snakemake's benchmark files."""
    rows = []
    for tsv in sorted((work / f"results/{name}/benchmarks").rglob("*.tsv")):
        b = pd.read_csv(tsv, sep="\t")
        rows.append({"rule": tsv.parent.name, "job": tsv.stem, "s": float(b["s"].iloc[0]),
                     "max_rss_mb": float(pd.to_numeric(b["max_rss"], errors="coerce").iloc[0])})
    jobs = pd.DataFrame(rows)
    return jobs.groupby("rule", sort=False).agg(jobs=("job", "count"), seconds=("s", "sum"),
                                                peak_rss_mb=("max_rss_mb", "max")).reset_index()


def throughput(work: Path, name: str, hub_root: Path, device: str, images: int) -> pd.DataFrame:
    """Images/s of evaluation over DTD's decoded cache and decoding its parquet every time."""
    import open_clip

    from pipeline.data.image_cache import DecodedImages
    from pipeline.data.parquet_datasets import ParquetSplit
    from pipeline.data.suites import task
    from pipeline.evaluation import batches
    from pipeline.hub import dataset_split_files
    from pipeline.zoo.store import load_clip

    spec = task("DTD")
    cache = DecodedImages(work / f"resources/data/{name}/DTD/test")
    files = dataset_split_files(hub_root / "datasets" / spec.dataset, spec.test_split)
    raw = ParquetSplit(files, spec.image_column, spec.label_column)
    transform = open_clip.image_transform(224, is_train=False)

    class Decoded(torch.utils.data.Dataset):  # the decode-every-time path of load_split without a cache
        def __len__(self):
            return len(raw)

        def __getitem__(self, i):
            image, label = raw[i]
            return transform(image), label

    encoder = load_clip({"arch": "ViT-B-32-quickgelu"}, work / f"resources/models/{name}/pretrained.safetensors").visual
    encoder.to(device).eval()
    rows = []
    for source, dataset in (("decoded cache", cache), ("decode every time", Decoded())):
        for model in (False, True):
            n = min(images, len(dataset)) if model else len(dataset)
            start, seen = time.perf_counter(), 0
            with torch.no_grad():
                for x, _ in batches(dataset, 128):  # the evaluation's batches; the first n images
                    if model:
                        encoder(x.to(device))
                    seen += len(x)
                    if seen >= n:
                        break
            if device == "cuda":
                torch.cuda.synchronize()
            rows.append({"source": source, "with ViT-B/32": model, "images": seen,
                         "images_per_s": seen / (time.perf_counter() - start)})
    return pd.DataFrame(rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cores", type=int, default=2)
    p.add_argument("--steps", type=int, default=10, help="AdaMerging steps (the paper: 500)")
    p.add_argument("--rss-images", type=int, nargs="*", default=[1000, 10000], help="test images per task")
    p.add_argument("--device", default="cpu", help="device of the throughput part")
    p.add_argument("--model-images", type=int, default=512, help="images through ViT-B/32 per throughput row")
    p.add_argument("--only", choices=["stages", "rss", "throughput"], action="append", help="default: all")
    p.add_argument("--workdir", type=Path, help="default: a temporary folder, removed at the end")
    p.add_argument("--md", type=Path, help="also write the tables as markdown here")
    args = p.parse_args()
    parts = args.only or ["stages", "rss", "throughput"]
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench_real_zoo_"))
    out = []
    try:
        hub = work / "hub"
        name = "bench_b32"
        if not (hub / "models").exists():
            build_hub(hub, REAL_SIZES, IMAGE_SIDES, None)
        cache = work / name / f"resources/data/{name}/DTD/test"
        if "stages" in parts or not cache.exists():  # the throughput part reads the workflow's DTD cache
            wall = run_workflow(work / name, hub, name, config(name, args.steps, args.cores), args.cores,
                                targets(name))
            if "stages" in parts:
                table = stage_table(work / name, name)
                out.append(f"## Stages (real sizes: {REAL_SIZES}; {wall:.0f} s wall on {args.cores} cores)\n\n"
                           + table.to_markdown(index=False, floatfmt=".1f"))
        if "rss" in parts:
            rows = []
            for n in args.rss_images:
                hub_n, name_n = work / f"hub_{n}", f"bench_b32_{n}"
                if not (hub_n / "datasets").exists():
                    build_hub(hub_n, dict.fromkeys(TASKS, n), dict.fromkeys(TASKS, (64, 64)), hub / "models")
                run_workflow(work / name_n, hub_n, name_n, config(name_n, args.steps, args.cores), args.cores,
                             [f"results/{name_n}/eval/adamerging_task_wise.parquet"])
                t = stage_table(work / name_n, name_n).set_index("rule")
                rows += [{"images per task": n, "rule": r, "seconds": t.loc[r, "seconds"],
                          "peak_rss_mb": t.loc[r, "peak_rss_mb"]} for r in ("adamerging", "evaluate", "decode_images")]
            rss = pd.DataFrame(rows)
            base = rss[rss["images per task"] == min(args.rss_images)].set_index("rule")["peak_rss_mb"]
            rss["rss vs smallest"] = rss["peak_rss_mb"] / rss["rule"].map(base)
            out.append("## Peak RSS against the test-set size\n\n" + rss.to_markdown(index=False, floatfmt=".2f"))
        if "throughput" in parts:
            t = throughput(work / name, name, hub, args.device, args.model_images)
            base = t.set_index(["with ViT-B/32", "source"])["images_per_s"]
            t["cache speed-up"] = [base[m, "decoded cache"] / base[m, "decode every time"] for m in t["with ViT-B/32"]]
            out.append(f"## Evaluation throughput on {args.device}\n\n" + t.to_markdown(index=False, floatfmt=".1f"))
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    text = "\n\n".join(out)
    print(text)
    if args.md:
        args.md.write_text(text + "\n")


if __name__ == "__main__":
    main()
