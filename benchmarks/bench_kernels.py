"""Benchmark the Triton kernels against their torch twins (and a kthvalue-based TIES).

For ViT-B/32 (~88M parameters, 8 tasks) and ViT-L/14 (~304M, 8 and 20 tasks) image-encoder
shapes: achieved GB/s of the weighted sum (forward, backward) and of TIES, their ratio to the
bandwidth of a large device-to-device copy measured in the same run, and the speed-up over
the torch twin and the kthvalue TIES. Without CUDA it times the torch twins at a tiny size.

    python benchmarks/bench_kernels.py [--json PATH] [--md PATH] [--configs NAME ...]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from kernels import ties_merge, weighted_sum  # noqa: E402
from kernels.ties_merge import RADIX_BITS  # noqa: E402

SPEC_BANDWIDTH = [  # (substring of torch.cuda.get_device_name, spec-sheet bytes/s), first match
    ("H200", 4.8e12), ("H100 NVL", 3.9e12), ("H100 PCIe", 2.0e12), ("H100", 3.35e12),
    ("A100 80GB PCIe", 1.935e12), ("A100-SXM4-80GB", 2.039e12), ("A100", 1.555e12),
    ("L40S", 0.864e12), ("A10G", 0.6e12), ("RTX 4090", 1.008e12),
]
KEEP_PERCENT = 20


def vit_segments(width: int, layers: int, patch: int, out_dim: int, image: int = 224) -> list[int]:
    """Parameter tensor sizes of an open_clip ViT image encoder, in state-dict order."""
    tokens = (image // patch) ** 2 + 1
    sizes = [3 * width * patch * patch, width, tokens * width, width, width]
    block = [width, width, 3 * width * width, 3 * width, width * width, width, width, width,
             4 * width * width, 4 * width, 4 * width * width, width]
    return sizes + block * layers + [width, width, width * out_dim]


CONFIGS = {
    "ViT-B/32 K=8": (vit_segments(768, 12, 32, 512), 8),
    "ViT-L/14 K=8": (vit_segments(1024, 24, 14, 768), 8),
    "ViT-L/14 K=20": (vit_segments(1024, 24, 14, 768), 20),
}
CPU_CONFIG = {"tiny K=4 (CPU)": (vit_segments(64, 2, 8, 32, image=32), 4)}


def ties_kthvalue(tvs: torch.Tensor, k: float, merge: str) -> torch.Tensor:
    """TIES the way the reference code computes it: torch.kthvalue over the whole matrix."""
    d = tvs.shape[1]
    kth = tvs.abs().kthvalue(d - int(d * k / 100), dim=1, keepdim=True).values
    trimmed = tvs * (tvs.abs() >= kth)
    sign = torch.sign(trimmed.sum(0))
    sign[sign == 0] = torch.sign(sign.sum())
    selected = trimmed * torch.where(sign > 0, trimmed > 0, trimmed < 0)
    out = selected.sum(0)
    return out / (selected != 0).sum(0).clamp(min=1) if merge == "mean" else out


def timed(fn: Callable[[], object], budget_s: float = 1.0, max_reps: int = 20,
          compiled: bool = False) -> tuple[float, int, object]:
    """Median seconds per call after one warm-up call, the number of timed calls, a result.
    A slow call's warm-up is its measurement, unless ``compiled`` (its first call compiles)."""
    cuda = torch.cuda.is_available()
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    if compiled:
        fn()
        sync()
    t0 = time.perf_counter()
    result = fn()
    sync()
    first = time.perf_counter() - t0
    if first > budget_s:
        return first, 1, result
    times = []
    for _ in range(max(1, min(max_reps, int(budget_s / max(first, 1e-6))))):
        del result
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            result = fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            result = fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times), len(times), result


def copy_bandwidth(n_bytes: int = 4 << 30) -> float:
    """Bytes/s of a device-to-device copy, counting bytes read and written."""
    src = torch.empty(n_bytes // 4, dtype=torch.float32, device="cuda").fill_(1.0)
    dst = torch.empty_like(src)
    seconds, _, _ = timed(lambda: dst.copy_(src), budget_s=0.5)
    del src, dst
    return 2 * n_bytes / seconds


def fits(n_bytes: float) -> bool:
    """Whether ``n_bytes`` of device memory are free (always true on CPU)."""
    if not torch.cuda.is_available():
        return True
    torch.cuda.empty_cache()
    return torch.cuda.mem_get_info()[0] > n_bytes


def bench_config(name: str, sizes: list[int], n_tasks: int, device: torch.device, impls: list[str],
                 copy_bw: float | None) -> list[dict]:
    n = sum(sizes)
    offsets = torch.tensor([0] + sizes).cumsum(0).tolist()
    gen = torch.Generator(device=device).manual_seed(0)
    tvs = torch.randn(n_tasks, n, generator=gen, device=device).mul_(1e-3)
    base = torch.randn(n, generator=gen, device=device)
    lambdas = torch.full((n_tasks, len(sizes)), 0.3, device=device, requires_grad=True)
    grad_out = torch.randn(n, generator=gen, device=device)
    elt = tvs.element_size()
    rows = []

    def row(op: str, impl: str, seconds: float, reps: int, n_bytes: float, **extra) -> dict:
        r = {"config": name, "op": op, "impl": impl, "N": n, "K": n_tasks, "ms": seconds * 1e3,
             "reps": reps, "GB/s": n_bytes / seconds / 1e9,
             "frac_copy_bw": n_bytes / seconds / copy_bw if copy_bw else None, **extra}
        rows.append(r)
        print(f"{name:16s} {op:22s} {impl:10s} {r['ms']:10.3f} ms {r['GB/s']:8.1f} GB/s"
              + (f"  {r['frac_copy_bw']:.2f} of copy" if copy_bw else ""), flush=True)
        return r

    fwd_bytes = n * 4 * 2 + n_tasks * n * elt
    bwd_bytes = n * 4 + n_tasks * n * elt
    for impl in impls:
        if impl == "torch" and not fits(1.2 * n_tasks * n * 4):
            continue
        fwd = lambda: weighted_sum(base, tvs, lambdas, offsets, backend=impl)  # noqa: E731
        seconds, reps, out = timed(fwd, compiled=impl == "triton")
        row("weighted_sum fwd", impl, seconds, reps, fwd_bytes)
        seconds, reps, _ = timed(lambda: torch.autograd.grad(out, lambdas, grad_out, retain_graph=True),
                                 compiled=impl == "triton")
        row("weighted_sum bwd", impl, seconds, reps, bwd_bytes)
        del out

    ties_passes = 32 // RADIX_BITS + 2  # radix passes, majority pass, apply pass
    read = n_tasks * n * elt
    merged, ties_rows = {}, {}
    for impl in impls:
        try:
            seconds, reps, merged[impl] = timed(lambda: ties_merge(tvs, KEEP_PERCENT, "mean", backend=impl),
                                                compiled=impl == "triton")
        except torch.OutOfMemoryError:
            print(f"{name:16s} ties_merge mean         {impl:10s} skipped: out of memory")
            torch.cuda.empty_cache()
            continue
        ties_rows[impl] = row("ties_merge mean", impl, seconds, reps, read + 4 * n)
    if "triton" in merged and "torch" in merged:
        traffic = (ties_passes * read + 4 * n) / ties_rows["triton"]["ms"] * 1e3
        ties_rows["triton"].update({
            "traffic_GB/s": traffic / 1e9, "traffic_frac_copy_bw": traffic / copy_bw,
            "bit_identical_to_twin": bool(torch.equal(merged["triton"].view(torch.int32),
                                                      merged["torch"].view(torch.int32)))})
        seconds, reps, _ = timed(lambda: ties_merge(tvs, KEEP_PERCENT, "mean", return_parts=True, backend="triton"),
                                 compiled=True)
        row("ties_merge mean+parts", "triton", seconds, reps, 2 * read + 4 * n)
    try:
        if not fits(4.5 * n_tasks * n * 4):
            raise MemoryError
        seconds, reps, reference = timed(lambda: ties_kthvalue(tvs, KEEP_PERCENT, "mean"))
        r = row("ties_merge mean", "kthvalue", seconds, reps, read + 4 * n)
        r["max_abs_diff_to_twin"] = float((reference - merged.get("torch", merged.get("triton"))).abs().max())
        del reference
    except (MemoryError, torch.OutOfMemoryError):
        print(f"{name:16s} ties_merge mean         kthvalue   skipped: out of memory")
    for r in rows:  # speed-ups of the Triton rows over the other implementations of the same op
        if r["impl"] == "triton":
            for other in rows:
                if other["op"] == r["op"] and other["impl"] != "triton":
                    r[f"speedup_vs_{other['impl']}"] = other["ms"] / r["ms"]
    return rows


def markdown(meta: dict, rows: list[dict]) -> str:
    lines = [f"# Kernel benchmark on {meta['device']}", ""]
    if meta.get("copy_GB/s"):
        lines += [f"Spec-sheet bandwidth {meta['spec_GB/s']} GB/s; measured device-to-device copy "
                  f"{meta['copy_GB/s']:.0f} GB/s (read + write).", ""]
    else:
        lines += ["No CUDA device: torch twins only, at a tiny size. GPU numbers need CUDA.", ""]
    cols = ["config", "op", "impl", "ms", "GB/s", "frac_copy_bw", "traffic_GB/s", "traffic_frac_copy_bw",
            "speedup_vs_torch",
            "speedup_vs_kthvalue", "bit_identical_to_twin"]
    lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = [r.get(c) for c in cols]
        lines.append("| " + " | ".join("" if v is None else f"{v:.3g}" if isinstance(v, float) else str(v)
                                       for v in cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, help="write the results as JSON here")
    parser.add_argument("--md", type=Path, help="write a markdown table here")
    parser.add_argument("--configs", nargs="*", default=list(CONFIGS), choices=list(CONFIGS))
    args = parser.parse_args()

    if torch.cuda.is_available():
        device = torch.device("cuda")
        name = torch.cuda.get_device_name()
        spec = next((bw for key, bw in SPEC_BANDWIDTH if key in name), None)
        copy_bw = copy_bandwidth()
        meta = {"device": name, "spec_GB/s": spec and spec / 1e9, "copy_GB/s": copy_bw / 1e9,
                "copy_frac_of_spec": spec and copy_bw / spec}
        print(f"{name}: spec-sheet {meta['spec_GB/s']} GB/s, device-to-device copy {copy_bw / 1e9:.0f} GB/s")
        configs = {c: CONFIGS[c] for c in args.configs}
        impls = ["triton", "torch"]
    else:
        device, copy_bw = torch.device("cpu"), None
        meta = {"device": "cpu"}
        print("No CUDA device: timing the torch twins at a tiny size; GPU numbers need CUDA.")
        configs, impls = CPU_CONFIG, ["torch"]
    meta.update(torch=torch.__version__, keep_percent=KEEP_PERCENT)
    try:
        import triton
        meta["triton"] = triton.__version__
    except ImportError:
        pass

    rows = []
    for name, (sizes, n_tasks) in configs.items():
        rows += bench_config(name, sizes, n_tasks, device, impls, copy_bw)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if args.json:
        args.json.write_text(json.dumps({"meta": meta, "results": rows}, indent=1))
    if args.md:
        args.md.write_text(markdown(meta, rows))


if __name__ == "__main__":
    main()
