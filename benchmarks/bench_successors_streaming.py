"""The streaming successors (DARE, consensus TA / TIES, TALL masks, EMR-Merging) against
FusionBench's implementations on the same random task vectors of a real image encoder's shapes.

    /tmp/fb-venv/bin/python benchmarks/bench_successors_streaming.py                  # 8 x ViT-B/32, + FusionBench
    .venv/bin/python benchmarks/bench_successors_streaming.py --tasks 3 --tensors 40  # reduced; ours only

The store is built as in benchmarks/bench_scale.py (fine-tuned = pretrained + N(0, 1e-3^2)).
Each merge runs in its own process (peak RSS = its VmHWM): ours streams the store through
the registry entry, as the workflow runs it; FusionBench's loads every task vector as a state
dict (what its algorithms hold once their model pools are loaded) and runs its own functions:
``module_random_drop_`` + ``state_dict_sum`` (``DareTaskArithmetic.run``), ``generate_task_masks``
of tall_mask/utils.py (with theta_0 = 0 and theta_t = tau_t, the same formula on exactly our
tensors; the consensus count, which FusionBench has no method for, is the authors' two lines),
``ties_merging`` for Consensus TIES' multi-task vector, ``emr_merge``. Without fusion_bench the
peers are skipped. Printed: max abs difference where the semantics are deterministic (DARE's
masks are random: the z-statistics of each merge against Task Arithmetic, ~0 and ~1 for an
unbiased drop with the right variance), time, peak RSS and their ratios; our Task Arithmetic
(one pass over the store) runs first, and each of our times is also given relative to it.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch
from safetensors import safe_open

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from benchmarks.bench_scale import OURS, compare, encoder_state, run_child, synthesise  # noqa: E402
from pipeline.merging.streamed import unpack_bits  # noqa: E402
from pipeline.store.task_vectors import Storage, TaskVectorStore  # noqa: E402

SETTINGS = {  # the registry defaults, spelled out (and what the peers are given)
    "task_arithmetic": {"lam": 0.3},  # ours only: the one-pass baseline the others' times are divided by
    "dare": {"p": 0.5, "base": "task_arithmetic", "seed": 0, "lam": 0.3},
    "consensus_ta": {"agree": 2, "mask_lambda": 0.6, "lam": 0.3},
    "consensus_ties": {"agree": 2, "mask_lambda": 0.6, "k": 20, "merge": "sum", "lam": 0.3},
    "tall_masks": {"mask_lambda": 0.6},
    "emr_merging": {},
}
ROUTED = ("tall_masks", "emr_merging")

PEER = r"""
import json, sys, time, torch
from safetensors.torch import load_file, save_file
from pipeline.merging.streamed import pack_bits
from pipeline.store.task_vectors import TaskVectorStore
root, tasks, pretrained, out, method, settings = sys.argv[1:]
s = json.loads(settings)
torch.set_num_threads(2)
start = time.perf_counter()
store = TaskVectorStore(root, tasks.split(","))
pre = load_file(pretrained)
tvs = []
for task in store.tasks:  # each task vector as a state dict, as FusionBench's algorithms hold them
    tv = {k: torch.empty(store.shapes[k]) for k in store.keys}
    for key, span, block in store.chunks(tasks=[task]):
        tv[key].view(-1)[span] = block[0]
    tvs.append(tv)
loaded = time.perf_counter()
result = {}

def like():  # a fresh reference for vector_to_state_dict (it overwrites its reference's tensors)
    return {k: torch.empty(store.shapes[k]) for k in store.keys}

def routed(vector, masks, scales):  # FusionBench's output in the layout of our RoutedMerge file
    out_tensors = {"scales": torch.as_tensor(scales, dtype=torch.float32)}
    for key in store.keys:
        out_tensors[f"vector.{key}"] = vector[key].float().contiguous()
        for t, task in enumerate(store.tasks):
            out_tensors[f"mask.{task}.{key}"] = pack_bits(masks[key][t].reshape(1, -1))[0]
    save_file(out_tensors, out)

if method == "dare":
    from fusion_bench.method.dare.utils import module_random_drop_
    from fusion_bench.utils.state_dict_arithmetic import state_dict_sum
    torch.manual_seed(s["seed"])
    for tv in tvs:
        module_random_drop_(tv, s["p"], rescale=True)
    total = state_dict_sum(tvs)
    merged = {k: v + s["lam"] * total[k] if k in total else v for k, v in pre.items()}
elif method in ("tall_masks", "consensus_ta", "consensus_ties"):
    from fusion_bench.method.tall_mask.utils import generate_task_masks
    from fusion_bench.utils import state_dict_to_vector, vector_to_state_dict
    flat = torch.vstack([state_dict_to_vector(tv) for tv in tvs])
    del tvs
    if method == "consensus_ties":
        from fusion_bench.method.ties_merging.ties_merging_utils import ties_merging
        mtl = ties_merging(flat, reset_thresh=s["k"], merge_func=s["merge"])
    else:
        mtl = flat.sum(0)
    zero = torch.zeros(flat.shape[1])  # theta_0 = 0, theta_t = tau_t: the formula on our exact tensors
    masks = generate_task_masks(flat, flat, zero, tv=mtl, tall_mask_lambda=s["mask_lambda"])
    if method == "tall_masks":
        per_key = {}
        for t in range(len(masks)):
            for k, m in vector_to_state_dict(masks[t].float(), like()).items():
                per_key.setdefault(k, []).append(m.bool())
        routed(vector_to_state_dict(mtl, like()), per_key, [1.0] * len(masks))
    else:
        vector = vector_to_state_dict(torch.where(masks.sum(0) >= s["agree"], mtl, 0.0) * s["lam"], like())
        merged = {k: v + vector[k] if k in vector else v for k, v in pre.items()}
elif method == "emr_merging":
    from fusion_bench.method.emr_merging.utils import emr_merge
    unified, masks, rescalers = emr_merge(tvs)
    l1 = torch.tensor([sum(float(tv[k].abs().double().sum()) for k in store.keys) for tv in tvs])
    l1_mod = torch.tensor([sum(float((unified[k].abs().double() * masks[k][t]).sum()) for k in store.keys)
                           for t in range(len(tvs))])
    result["scales_eq5"] = (l1 / l1_mod).tolist()  # the paper's rescaler from FusionBench's election and masks
    routed(unified, masks, rescalers)
done = time.perf_counter()
if method not in ROUTED:
    save_file({k: v.contiguous() for k, v in merged.items()}, out)
print(json.dumps({**result, "load_seconds": loaded - start, "merge_seconds": done - loaded,
                  "seconds": time.perf_counter() - start}))
""".replace("ROUTED", repr(ROUTED))


def routed_diff(ours: Path, peer: Path) -> dict:
    """Max abs difference of the stored vectors, mask bits that differ, the two sets of scales."""
    worst, bits, total = 0.0, 0, 0
    with safe_open(str(ours), "pt") as a, safe_open(str(peer), "pt") as b:
        keys, tasks = json.loads(a.metadata()["keys"]), json.loads(a.metadata()["tasks"])
        for key in keys:
            x, y = a.get_tensor(f"vector.{key}"), b.get_tensor(f"vector.{key}")
            worst = max(worst, float((x.double() - y.double().reshape(x.shape)).abs().max()))
            for task in tasks:
                n = x.numel()
                m1 = unpack_bits(a.get_tensor(f"mask.{task}.{key}"), n)
                m2 = unpack_bits(b.get_tensor(f"mask.{task}.{key}"), n)
                bits += int((m1 != m2).sum())
                total += n
        return {"vector_max_abs_diff": worst, "mask_bits_differing": bits, "mask_bits": total,
                "scales_ours": a.get_tensor("scales").tolist(), "scales_peer": b.get_tensor("scales").tolist()}


def dare_z(store: TaskVectorStore, merged: Path, pretrained: Path, p: float, lam: float) -> dict:
    """z = (merge - pretrained - lam * sum_t tau_t) / (lam * sqrt(sum_t tau_t^2 p / (1 - p))) per
    entry: its mean and mean square (0 and 1 for an unbiased drop with DARE's variance), and
    the fraction of entries every task dropped (expected p^K)."""
    n = z_sum = z2_sum = dropped = 0.0
    with safe_open(str(merged), "pt") as out, safe_open(str(pretrained), "pt") as pre:
        for key in store.keys:
            size = math.prod(store.shapes[key])
            tvs = store.read_block(key, slice(0, size)).double()
            delta = out.get_tensor(key).double().reshape(-1) - pre.get_tensor(key).double().reshape(-1)
            sd = lam * ((tvs ** 2).sum(0) * p / (1 - p)).sqrt()
            z = (delta - lam * tvs.sum(0)) / sd
            n, z_sum, z2_sum = n + size, z_sum + float(z.sum()), z2_sum + float((z ** 2).sum())
            dropped += float((delta == 0).sum())
    return {"z_mean": z_sum / n, "z2_mean": z2_sum / n, "all_dropped": dropped / n,
            "expected_all_dropped": p ** len(store.tasks)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="ViT-B-32", help="open_clip architecture whose image encoder shapes are used")
    p.add_argument("--tasks", type=int, default=8)
    p.add_argument("--tensors", type=int, default=0, help="keep only the first N floating tensors (0: all)")
    p.add_argument("--methods", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    p.add_argument("--workdir", type=Path, default=Path("results/successors"))
    p.add_argument("--budget-mib", type=float, default=1024)
    p.add_argument("--json", type=Path, help="write the results here")
    a = p.parse_args()
    try:
        import fusion_bench  # noqa: F401
        peer = True
    except ImportError:
        peer = False
        print("fusion_bench is not importable: peers skipped (run with /tmp/fb-venv/bin/python to compare)")
    torch.set_num_threads(2)
    work = a.workdir / f"{a.model}-K{a.tasks}-T{a.tensors}"
    work.mkdir(parents=True, exist_ok=True)
    state = {k: v for k, v in encoder_state(a.model).items() if v.is_floating_point()}
    if a.tensors:
        state = dict(list(state.items())[: a.tensors])
    pre_path = work / "pretrained.safetensors"
    from safetensors.torch import save_file

    save_file(state, pre_path)
    store = synthesise(work / "tv.zarr", state, a.tasks, Storage(), 4.0)
    n = sum(v.numel() for v in state.values())
    del state
    tasks = ",".join(store.tasks)
    print(f"{a.model}{f' (first {a.tensors} tensors)' if a.tensors else ''} x {a.tasks}: N = {n / 1e6:.2f}M per "
          f"task, store {store.nbytes() / 1e9:.2f} GB", flush=True)
    results = {"model": a.model, "tasks": a.tasks, "tensors": a.tensors, "N": n, "methods": {}}
    dare = SETTINGS["dare"]
    for method in a.methods:
        settings = json.dumps(SETTINGS[method])
        out = {side: work / f"{side}-{method}.safetensors" for side in ("ours", "peer")}
        ours = run_child(sys.executable, OURS, [str(store.root), tasks, str(pre_path), str(out["ours"]),
                                                str(a.budget_mib), method, settings], work / f"ours-{method}.log")
        row = {"ours": ours}
        line = f"{method}: ours {ours['wall_s']:.1f} s wall, {ours['peak_rss_gib']:.2f} GiB peak RSS"
        if "task_arithmetic" in results["methods"]:
            row["vs_task_arithmetic"] = ours["wall_s"] / results["methods"]["task_arithmetic"]["ours"]["wall_s"]
            line += f" ({row['vs_task_arithmetic']:.2f}x Task Arithmetic's time)"
        if "storage" in ours:
            stored = ours["storage"]
            line += (f", {stored['bytes'] / 2**20:.1f} MiB on disk = {100 * stored['fraction_of_full_models']:.1f}% "
                     f"of {a.tasks} models")
        if method == "dare":
            row["ours_z"] = dare_z(store, out["ours"], pre_path, dare["p"], dare["lam"])
            line += f"; z vs TA {row['ours_z']}"
        print(line, flush=True)
        if peer and method != "task_arithmetic":
            fb = run_child(sys.executable, PEER, [str(store.root), tasks, str(pre_path), str(out["peer"]), method,
                                                  settings], work / f"peer-{method}.log")
            row["fusion_bench"] = fb
            if method in ROUTED:
                row["diff"] = routed_diff(out["ours"], out["peer"])
            elif method == "dare":
                row["diff"] = {"peer_z": dare_z(store, out["peer"], pre_path, dare["p"], dare["lam"])}
            else:
                row["diff"] = compare(out["ours"], out["peer"])
            if method == "emr_merging":
                eq5, ours_scales = torch.tensor(fb["scales_eq5"]), torch.tensor(row["diff"]["scales_ours"])
                row["diff"]["scales_vs_eq5_from_peer_max_rel"] = float(((ours_scales - eq5) / eq5).abs().max())
            print(f"{method}: FusionBench {fb['wall_s']:.1f} s wall (loading {fb['load_seconds']:.1f} s, merging "
                  f"{fb['merge_seconds']:.1f} s), {fb['peak_rss_gib']:.2f} GiB peak RSS; ratios FusionBench / ours: "
                  f"memory {fb['peak_rss_gib'] / ours['peak_rss_gib']:.1f}x, time {fb['wall_s'] / ours['wall_s']:.2f}x;"
                  f" {row['diff']}", flush=True)
        results["methods"][method] = row
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
