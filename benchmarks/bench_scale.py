"""Out-of-core TIES (or any streamed method: ``--method``) at scale: K random task vectors of a
real image encoder's shapes in a zarr store on disk, merged by the streaming engine through the
method's registry entry, against one sequential read of the store and, for TIES
with ``--peer``, against FusionBench's TIES (the dense in-memory way: flatten K x N, kthvalue
per row) run by the peer itself on the same task vectors: its ``state_dict_to_vector`` and
``ties_merging``, what its ``TiesMergingAlgorithm.run`` calls once the models are loaded (the
whole algorithm with 9 loaded ViT-B/32 models was killed for memory on a 24 GB machine).

    python benchmarks/bench_scale.py --model ViT-L-14 --tasks 20 --workdir /path/with/30GB
    /tmp/fb-venv/bin/python benchmarks/bench_scale.py --model ViT-B-32 --tasks 8 --peer
    python benchmarks/bench_scale.py --config benchmarks/scale.yaml
    python benchmarks/bench_scale.py --model ViT-B-32 --tasks 8 --method emr_merging

Each merge runs in its own process; its peak RSS is that process's VmHWM (not ru_maxrss, which
holds the resident size of the parent the child was forked from). The page cache
is dropped before each timed phase when the user may (root), so every phase reads from disk.
With ``--twin`` (default for models up to ViT-B size) the in-memory torch twin
(``kernels.ties_merge`` on the K x N matrix) checks that the streamed output is identical.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from pipeline.merging import registry  # noqa: E402
from pipeline.store.task_vectors import Storage, TaskVectorStore, write_diffs  # noqa: E402

K_PERCENT, LAM, MERGE = 20, 0.3, "mean"
STREAMED = registry.names(registry.STORE)  # the methods on task vectors that give one result for all tasks


def encoder_state(model: str) -> dict[str, torch.Tensor]:
    """A randomly initialised open_clip image encoder's state dict (the real shapes)."""
    import open_clip

    torch.manual_seed(0)
    return open_clip.create_model(model, pretrained=None).visual.state_dict()


def check_disk(workdir: Path, need: int) -> None:
    free = shutil.disk_usage(workdir).free
    if free < need:
        sys.exit(f"bench_scale needs {need / 1e9:.1f} GB free in {workdir} for the store, the pretrained and the "
                 f"merged model, and has {free / 1e9:.1f} GB: pass --workdir on a larger disk or fewer --tasks")


def drop_caches() -> bool:
    """Drop the page cache (needs root); whether it worked."""
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def synthesise(root: Path, pretrained: dict[str, torch.Tensor], tasks: int, storage: Storage,
               chunk_mib: float) -> TaskVectorStore:
    """K task vectors (fine-tuned = pretrained + N(0, 1e-3^2) noise, seeded per task, minus
    pretrained, in fp32 as from real checkpoints), written tensor by tensor; complete
    subgroups of an earlier run are reused."""
    names = [f"task{j:02d}" for j in range(tasks)]
    for j, name in enumerate(names):
        try:
            TaskVectorStore(root, [name])
            continue
        except (FileNotFoundError, ValueError):  # none, or unreadable: rewritten
            pass
        gen = torch.Generator().manual_seed(1000 + j)
        diffs = ((key, (value + torch.randn(value.shape, generator=gen).mul_(1e-3)) - value, value.dtype)
                 for key, value in pretrained.items() if value.is_floating_point())  # fine-tuned minus pretrained
        write_diffs(root, name, diffs, "random-init", f"synthetic-{j}", chunk_mib, storage)
    return TaskVectorStore(root, names)


def sequential_read(store: TaskVectorStore) -> tuple[float, int]:
    """Seconds and bytes to read every chunk file of the store once, in order."""
    buf = bytearray(64 << 20)
    total, start = 0, time.perf_counter()
    for task in store.tasks:
        for path in sorted(p for p in (store.root / task).rglob("*") if p.is_file() and p.name != "zarr.json"):
            with open(path, "rb", buffering=0) as f:
                while n := f.readinto(buf):
                    total += n
    return time.perf_counter() - start, total


OURS = r"""
import json, sys, torch
from pipeline.merging import registry
from pipeline.merging.contract import Inputs
from pipeline.store.streaming import LazyStateDict
from pipeline.store.task_vectors import TaskVectorStore
root, tasks, pretrained, out, budget, method, settings = sys.argv[1:]
torch.set_num_threads(2)
spec, tasks = registry.method(method), tasks.split(",")
inputs = Inputs(LazyStateDict(pretrained), tasks, TaskVectorStore(root, tasks), budget_mib=float(budget))
print(json.dumps(spec.run(inputs, spec.configure(json.loads(settings))).save(out)))
"""
TIES_SETTINGS = {"k": K_PERCENT, "merge": MERGE, "lam": LAM}  # what the twin and the peer compute

PEER = r"""
import json, sys, time, torch
from safetensors.torch import load_file, save_file
from fusion_bench.method.ties_merging.ties_merging_utils import state_dict_to_vector, ties_merging, vector_to_state_dict
from pipeline.store.task_vectors import TaskVectorStore
root, tasks, pretrained, out = sys.argv[1], sys.argv[2].split(","), sys.argv[3], sys.argv[4]
torch.set_num_threads(2)
start = time.perf_counter()
store = TaskVectorStore(root, tasks)
base = {k: v for k, v in load_file(pretrained).items() if k in store.shapes}
flat = []
for task in tasks:  # each task vector as FusionBench flattens a state dict
    tv = {k: torch.empty(store.shapes[k]) for k in store.keys}
    for key, span, block in store.chunks(tasks=[task]):
        tv[key].view(-1)[span] = block[0]
    flat.append(state_dict_to_vector(tv))
    del tv
flat = torch.vstack(flat)
loaded = time.perf_counter()
merged = state_dict_to_vector(base) + %(lam)s * ties_merging(flat, reset_thresh=%(k)s, merge_func="%(merge)s")
done = time.perf_counter()
del flat
merged = vector_to_state_dict(merged, base)
save_file({**load_file(pretrained), **{k: v.contiguous() for k, v in merged.items()}}, out)
print(json.dumps({"load_seconds": loaded - start, "merge_seconds": done - loaded, "seconds": done - start}))
""" % {"k": K_PERCENT, "merge": MERGE, "lam": LAM}


# The child's own peak RSS: its VmHWM, which exec resets. Its ru_maxrss is not: it keeps the
# resident size of the parent it was forked (vfork'ed) from, a floor of the parent's RSS.
PEAK = """
import json as _json, re as _re
print(_json.dumps({"vm_hwm_kib": int(_re.search(r"VmHWM:\\s+(\\d+)", open("/proc/self/status").read()).group(1))}))
"""


def run_child(python: str, code: str, args: list[str], log: Path) -> dict:
    """Run ``code`` (which prints its JSON result last) in a fresh process; its result, wall
    seconds and peak RSS (GiB: VmHWM where /proc is, else ru_maxrss, an upper bound)."""
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    start = time.perf_counter()
    linux = Path("/proc/self/status").exists()
    with open(log, "w") as err:
        proc = subprocess.Popen([python, "-c", code + PEAK * linux, *args], stdout=subprocess.PIPE, stderr=err,
                                text=True, env=env)
        out = proc.stdout.read()
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{python} failed (exit {os.waitstatus_to_exitcode(status)}); see {log}")
    lines = out.strip().splitlines()
    peak_kib = json.loads(lines.pop())["vm_hwm_kib"] if linux else usage.ru_maxrss
    return {**json.loads(lines[-1]), "wall_s": wall, "peak_rss_gib": peak_kib / 2**20}


def compare(path_a: Path, path_b: Path) -> dict:
    """Largest absolute difference and fraction of bit-identical entries of two checkpoints."""
    from safetensors import safe_open

    worst, equal, total = 0.0, 0, 0
    with safe_open(str(path_a), "pt") as a, safe_open(str(path_b), "pt") as b:
        for key in a.keys():
            x, y = a.get_tensor(key), b.get_tensor(key)
            worst = max(worst, float((x.double() - y.double()).abs().max()) if x.numel() else 0.0)
            equal += int((x == y).sum())
            total += x.numel()
    return {"max_abs_diff": worst, "identical_fraction": equal / total}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", type=Path, help="a YAML file with any of the options below (e.g. benchmarks/scale.yaml)")
    p.add_argument("--model", default="ViT-B-32", help="open_clip architecture whose image encoder shapes are used")
    p.add_argument("--tasks", type=int, default=8)
    p.add_argument("--workdir", type=Path, default=Path("results/scale"))
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--codec", default="none", choices=["none", "zstd", "blosc"])
    p.add_argument("--chunk-mib", type=float, default=4.0)
    p.add_argument("--budget-mib", type=float, default=1024)
    p.add_argument("--method", default="ties_merging", choices=STREAMED,
                   help="the streamed method to run (the twin and the peer are TIES': ties_merging only)")
    p.add_argument("--peer", action="store_true", help="also run fusion_bench's TIES (needs fusion_bench importable)")
    p.add_argument("--twin", action=argparse.BooleanOptionalAction, default=None,
                   help="check the output against the in-memory twin (default: models with at most 150M parameters)")
    p.add_argument("--keep", action="store_true", help="keep the store for a later run")
    p.add_argument("--json", type=Path, help="write the results here")
    a = p.parse_args()
    if a.config:  # the file's values become defaults; options on the command line win
        p.set_defaults(**{k.replace("-", "_"): v for k, v in yaml.safe_load(a.config.read_text()).items()})
        a = p.parse_args()
        a.workdir = Path(a.workdir)
    if a.method != "ties_merging" and (a.peer or a.twin):
        p.error(f"--peer and --twin compare TIES; {a.method} against FusionBench: "
                "benchmarks/bench_successors_streaming.py")

    torch.set_num_threads(2)
    storage = Storage(a.dtype, a.codec)
    work = a.workdir / f"{a.model}-K{a.tasks}-{a.dtype}-{a.codec}-{a.chunk_mib:g}MiB"
    work.mkdir(parents=True, exist_ok=True)
    pretrained = encoder_state(a.model)
    n = sum(v.numel() for v in pretrained.values() if v.is_floating_point())
    check_disk(work, int(1.05 * (a.tasks * n * storage.itemsize + 3 * n * 4)) - sum(
        f.stat().st_size for f in work.rglob("*") if f.is_file()))
    from safetensors.torch import save_file

    pre_path = work / "pretrained.safetensors"
    if not pre_path.exists():
        save_file(pretrained, pre_path)
    t0 = time.perf_counter()
    store = synthesise(work / "tv.zarr", pretrained, a.tasks, storage, a.chunk_mib)
    synth_s = time.perf_counter() - t0
    del pretrained
    tasks = ",".join(store.tasks)
    res = {"model": a.model, "tasks": a.tasks, "N": n, "storage": vars(storage) | {"chunk_mib": a.chunk_mib},
           "store_bytes": store.nbytes(), "synthesise_s": synth_s, "budget_mib": a.budget_mib}
    print(f"{a.model} x {a.tasks}: N = {n / 1e6:.1f}M per task, store {res['store_bytes'] / 1e9:.2f} GB on disk "
          f"({a.dtype}, {a.codec}), built/checked in {synth_s:.0f} s", flush=True)

    res["caches_dropped"] = drop_caches()
    res["read_s"], _ = sequential_read(store)
    print(f"sequential read of the store: {res['read_s']:.1f} s ({res['store_bytes'] / res['read_s'] / 1e9:.2f} GB/s), "
          f"page cache {'dropped' if res['caches_dropped'] else 'NOT dropped (not root)'}", flush=True)

    drop_caches()
    settings = TIES_SETTINGS if a.method == "ties_merging" else {}
    ours = run_child(sys.executable, OURS, [str(store.root), tasks, str(pre_path), str(work / "ours.safetensors"),
                                            str(a.budget_mib), a.method, json.dumps(settings)], work / "ours.log")
    res |= {"method": a.method, "ours": ours}
    stored = ours.get("storage")
    print(f"ours (streaming {a.method}, budget {a.budget_mib:g} MiB): {ours['wall_s']:.1f} s wall, {ours['passes']} "
          f"passes, {ours['peak_rss_gib']:.2f} GiB peak RSS, {ours['wall_s'] / res['read_s']:.2f}x one sequential read"
          + (f", {stored['bytes'] / 1e9:.2f} GB on disk ({100 * stored['fraction_of_full_models']:.1f}% of "
             f"{a.tasks} models)" if stored else ""), flush=True)

    if a.method == "ties_merging" and (a.twin if a.twin is not None else n <= 150e6):
        from safetensors.torch import load_file

        from kernels import ties_merge
        from pipeline.functional import FlatLayout

        base = load_file(pre_path)
        layout = FlatLayout.of({k: base[k] for k in store.keys})
        tvs = torch.empty(a.tasks, n)
        for key, span, block in store.chunks():
            off = layout.offsets[layout.names.index(key)]
            tvs[:, off + span.start: off + span.stop] = block
        merged = ties_merge(tvs, K_PERCENT, MERGE, backend="torch")
        del tvs
        twin = {k: (base[k].float() + LAM * v).to(base[k].dtype) for k, v in layout.unflatten(merged).items()}
        save_file({**base, **twin}, work / "twin.safetensors")
        del base, twin, merged
        res["ours_vs_twin"] = compare(work / "ours.safetensors", work / "twin.safetensors")
        print(f"ours vs in-memory twin: {res['ours_vs_twin']}", flush=True)

    if a.peer:
        drop_caches()
        peer = run_child(sys.executable, PEER, [str(store.root), tasks, str(pre_path), str(work / "peer.safetensors")],
                         work / "peer.log")
        res["fusion_bench"] = peer
        res["ours_vs_fusion_bench"] = compare(work / "ours.safetensors", work / "peer.safetensors")
        print(f"fusion_bench ties_merging on the flattened K x N matrix: {peer['wall_s']:.1f} s wall (loading {peer['load_seconds']:.1f} s, "
              f"merging {peer['merge_seconds']:.1f} s), {peer['peak_rss_gib']:.2f} GiB peak RSS", flush=True)
        print(f"ratios from this run: memory fusion_bench / ours = {peer['peak_rss_gib'] / ours['peak_rss_gib']:.1f}x, "
              f"time fusion_bench / ours = {peer['wall_s'] / ours['wall_s']:.2f}x (merge step alone "
              f"{peer['merge_seconds'] / ours['wall_s']:.2f}x); ours vs fusion_bench: {res['ours_vs_fusion_bench']}")
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(res, indent=1))
    if not a.keep:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
