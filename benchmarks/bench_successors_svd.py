"""The per-matrix successor methods against FusionBench: TSV-M, Iso-C, Iso-CTS and WUDI on K
random task vectors of an open_clip image encoder's shapes (ViT-B/32 by default; the first
``--blocks`` transformer blocks and every tensor outside the blocks).

Ours streams the zarr store tensor by tensor through the registry entry and writes the merged
encoder (``merge.save``); FusionBench's own functions (``compute_and_sum_svd_mem_reduction``,
``iso_c``, ``iso_cts``, ``wudi_merging``, what its algorithms' ``run`` calls once the models
are loaded) get the same task vectors the way those algorithms hold them, a list of K state
dicts in memory, with the same settings (TSV-M alpha 1, Iso alpha 1.5 and fraction 0.8, WUDI
``--wudi-steps`` Adam steps, FusionBench's WUDI told to average ``positional_embedding`` and
``proj`` as ours does). Each merge runs in a fresh process: wall and merge seconds, peak RSS
(ru_maxrss) and on CUDA peak device memory; then the largest absolute difference between the
two merged encoders, next to the largest entry of the update. Ratios are FusionBench / ours.

    /tmp/fb-venv/bin/python benchmarks/bench_successors_svd.py             # 1 block, 8 tasks, + FusionBench
    .venv/bin/python benchmarks/bench_successors_svd.py                    # ours only (FusionBench skipped)
    python benchmarks/bench_successors_svd.py --blocks 12 --device cuda    # the whole encoder (benchmarks/gpu.sh)
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import sys
import tempfile
from pathlib import Path


REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "benchmarks")]
from bench_scale import compare, encoder_state, run_child, synthesise  # noqa: E402

from pipeline.store.task_vectors import Storage  # noqa: E402

METHODS = ("tsv_merging", "iso_c", "iso_cts", "wudi")

PEAK = r"""
def peak_rss_gib():  # this process's high-water RSS since its exec
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20
"""

OURS = PEAK + r"""
import json, sys, time, torch
from pipeline.merging import registry
from pipeline.merging.contract import Inputs
from pipeline.store.streaming import LazyStateDict
from pipeline.store.task_vectors import TaskVectorStore
root, tasks, pretrained, out, method, settings, device, threads = sys.argv[1:9]
if int(threads):
    torch.set_num_threads(int(threads))
spec = registry.method(method)
store = TaskVectorStore(root, tasks.split(","))
inputs = Inputs(LazyStateDict(pretrained), store.tasks, store, device=device, progress=False)
start = time.perf_counter()
spec.run(inputs, spec.configure(json.loads(settings))).save(out)
cuda = torch.device(device).type == "cuda"
if cuda:
    torch.cuda.synchronize()
print(json.dumps({"merge_seconds": time.perf_counter() - start, "peak_rss_gib": peak_rss_gib(),
                  "device_peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None}))
"""

PEER = PEAK + r"""
import json, sys, time, torch
from safetensors.torch import load_file, save_file
from pipeline.store.task_vectors import TaskVectorStore
root, tasks, pretrained, out, method, settings, device, threads = sys.argv[1:9]
settings = json.loads(settings)
if int(threads):
    torch.set_num_threads(int(threads))
if method == "tsv_merging":
    from fusion_bench.method.task_singular_vector.utils.TSVM_utils import compute_and_sum_svd_mem_reduction
    merge = lambda tvs: compute_and_sum_svd_mem_reduction(tvs, exclude_keys=[], accelerator=device)
elif method == "iso_c":
    from fusion_bench.method.isotropic_merging.iso_utils import iso_c
    merge = lambda tvs: iso_c(tvs, accelerator=device, exclude_keys=[])
elif method == "iso_cts":
    from fusion_bench.method.isotropic_merging.iso_utils import iso_cts
    merge = lambda tvs: iso_cts(tvs, settings["common_space_fraction"], accelerator=device, exclude_keys=[])
else:
    from fusion_bench.method.wudi.wudi import wudi_merging
    merge = lambda tvs: wudi_merging(tvs, accelerator=device, iter_num=settings["steps"],
                                     exclude_keys=settings["exclude_keys"])
start = time.perf_counter()
store = TaskVectorStore(root, tasks.split(","))
tvs = []
for task in store.tasks:  # each task vector a state dict in memory, as FusionBench's algorithms hold them
    tv = {k: torch.empty(store.shapes[k]) for k in store.keys}
    for key, span, block in store.chunks(tasks=[task]):
        tv[key].view(-1)[span] = block[0]
    tvs.append(tv)
loaded = time.perf_counter()
merged = merge(tvs)
cuda = torch.device(device).type == "cuda"
if cuda:
    torch.cuda.synchronize()
done = time.perf_counter()
del tvs
base = load_file(pretrained)
alpha = settings.get("alpha", 1.0)
save_file({k: (v + alpha * merged[k].detach().cpu()).contiguous() if k in merged else v for k, v in base.items()},
          out)
print(json.dumps({"load_seconds": loaded - start, "merge_seconds": done - loaded, "peak_rss_gib": peak_rss_gib(),
                  "device_peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None}))
"""


def settings(method: str, wudi_steps: int, matrices_not_linear: list[str]) -> tuple[dict, dict]:
    """(ours, FusionBench's) settings of ``method``: our defaults, the same values for the peer."""
    if method == "tsv_merging":
        return {}, {"alpha": 1.0}
    if method == "iso_c":
        return {}, {"alpha": 1.5}
    if method == "iso_cts":
        return {}, {"alpha": 1.5, "common_space_fraction": 0.8}
    return {"steps": wudi_steps}, {"steps": wudi_steps, "exclude_keys": matrices_not_linear}


def max_update(merged: Path, pretrained: Path) -> float:
    """The largest |merged - pretrained| entry: the scale the differences are read against."""
    from safetensors import safe_open

    worst = 0.0
    with safe_open(str(merged), "pt") as a, safe_open(str(pretrained), "pt") as b:
        for key in a.keys():
            x, y = a.get_tensor(key), b.get_tensor(key)
            if x.numel():
                worst = max(worst, float((x.double() - y.double()).abs().max()))
    return worst


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="ViT-B-32", help="open_clip architecture whose image encoder shapes are used")
    p.add_argument("--blocks", type=int, default=1, help="transformer blocks kept (ViT-B/32 has 12)")
    p.add_argument("--tasks", type=int, default=8)
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--wudi-steps", type=int, default=300, help="Adam steps of WUDI, ours and FusionBench's")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2, help="torch threads of each merge (0: torch's default)")
    p.add_argument("--peer", action=argparse.BooleanOptionalAction, default=None,
                   help="run FusionBench's functions too (default: when fusion_bench is importable)")
    p.add_argument("--workdir", type=Path, help="where the store and the merged encoders go (default: a temporary "
                                                "folder, removed at the end)")
    p.add_argument("--json", type=Path)
    p.add_argument("--md", type=Path, help="write the table as Markdown here")
    a = p.parse_args()
    peer = a.peer if a.peer is not None else importlib.util.find_spec("fusion_bench") is not None
    if not peer:
        print(f"fusion_bench is not importable by {sys.executable}: FusionBench's runs are skipped "
              "(run this script with /tmp/fb-venv/bin/python to compare)", flush=True)

    from pipeline.merging.wudi import is_linear

    full = encoder_state(a.model)
    pretrained = {k: v for k, v in full.items()
                  if ".resblocks." not in k or int(k.split(".resblocks.")[1].split(".")[0]) < a.blocks}
    del full
    work = Path(tempfile.mkdtemp(prefix="bench_successors_", dir=a.workdir))
    try:
        from safetensors.torch import save_file

        pre_path = work / "pretrained.safetensors"
        save_file(pretrained, pre_path)
        store = synthesise(work / "tv.zarr", pretrained, a.tasks, Storage(), 4.0)
        matrices_not_linear = [k for k in store.keys if len(store.shapes[k]) == 2 and not is_linear(k, store.shapes[k])]
        n = sum(v.numel() for v in pretrained.values() if v.is_floating_point())
        del pretrained
        print(f"{a.model}, {a.blocks} block(s) and the tensors outside them: {n / 1e6:.1f}M entries per task, "
              f"{a.tasks} tasks, device {a.device}, {a.threads or 'default'} threads", flush=True)
        tasks = ",".join(store.tasks)
        rows = []
        for method in a.methods:
            ours_settings, peer_settings = settings(method, a.wudi_steps, matrices_not_linear)

            def args(who: str, values: dict) -> list[str]:
                return [str(store.root), tasks, str(pre_path), str(work / f"{method}_{who}.safetensors"), method,
                        json.dumps(values), a.device, str(a.threads)]

            row = {"method": method,
                   "ours": run_child(sys.executable, OURS, args("ours", ours_settings), work / f"{method}_ours.log")}
            print(f"{method}: ours {row['ours']['wall_s']:.1f} s wall ({row['ours']['merge_seconds']:.1f} s merging), "
                  f"{row['ours']['peak_rss_gib']:.2f} GiB peak RSS", flush=True)
            row["max_update"] = max_update(work / f"{method}_ours.safetensors", pre_path)
            if peer:
                row["fusion_bench"] = run_child(sys.executable, PEER, args("peer", peer_settings),
                                                work / f"{method}_peer.log")
                row["diff"] = compare(work / f"{method}_ours.safetensors", work / f"{method}_peer.safetensors")
                fb = row["fusion_bench"]
                print(f"{method}: FusionBench {fb['wall_s']:.1f} s wall ({fb['load_seconds']:.1f} s loading the task "
                      f"vectors, {fb['merge_seconds']:.1f} s merging), {fb['peak_rss_gib']:.2f} GiB peak RSS; "
                      f"max |ours - FusionBench| {row['diff']['max_abs_diff']:.3g} (largest update entry "
                      f"{row['max_update']:.3g})", flush=True)
            rows.append(row)
        table = markdown(rows, a)
        print("\n" + table)
        if a.md:
            a.md.parent.mkdir(parents=True, exist_ok=True)
            a.md.write_text(table + "\n")
        if a.json:
            a.json.parent.mkdir(parents=True, exist_ok=True)
            a.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(a).items()}, "rows": rows}, indent=1))
    finally:
        shutil.rmtree(work)


def markdown(rows: list[dict], a: argparse.Namespace) -> str:
    """The results as a Markdown table, ratios FusionBench / ours."""
    gpu = a.device.startswith("cuda")
    head = ["method", "ours: merge s", "ours: wall s", "ours: peak RSS GiB"]
    head += ["ours: device peak GiB"] if gpu else []
    head += ["FusionBench: merge s", "FusionBench: wall s", "FusionBench: peak RSS GiB"]
    head += ["FusionBench: device peak GiB"] if gpu else []
    head += ["merge time FB/ours", "wall FB/ours", "RSS FB/ours", "max abs diff", "largest update"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for row in rows:
        ours, fb = row["ours"], row.get("fusion_bench")
        cells = [row["method"] + (f" ({a.wudi_steps} steps)" if row["method"] == "wudi" else ""),
                 f"{ours['merge_seconds']:.2f}", f"{ours['wall_s']:.1f}", f"{ours['peak_rss_gib']:.2f}"]
        cells += [f"{ours['device_peak_gib']:.2f}"] if gpu else []
        if fb:
            cells += [f"{fb['merge_seconds']:.2f}", f"{fb['wall_s']:.1f}", f"{fb['peak_rss_gib']:.2f}"]
            cells += [f"{fb['device_peak_gib']:.2f}"] if gpu else []
            cells += [f"{fb['merge_seconds'] / ours['merge_seconds']:.2f}x", f"{fb['wall_s'] / ours['wall_s']:.2f}x",
                      f"{fb['peak_rss_gib'] / ours['peak_rss_gib']:.2f}x", f"{row['diff']['max_abs_diff']:.3g}"]
        else:
            cells += ["skipped"] * (3 + gpu) + ["", "", "", ""]
        cells.append(f"{row['max_update']:.3g}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
