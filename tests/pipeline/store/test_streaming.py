"""Out-of-core merging: streamed results equal in-memory ones, the memory budget holds."""
import json
import subprocess
import sys

import pytest
import torch
from helpers.merging import merged
from helpers.store import SHAPES, TASKS, make_store, n_total, task_vectors
from helpers.workflow import REPO
from safetensors.torch import load_file, save_file

from kernels import ties_merge, ties_thresholds
from pipeline.merging import registry
from pipeline.merging.contract import Inputs, apply_vector
from pipeline.merging.streamed import Scaled
from pipeline.merging.ties_merging import Ties, exact_thresholds
from pipeline.store.streaming import Linear, Reader, merge_to_file, merge_to_memory
from pipeline.store.task_vectors import TaskVectorStore, write_diffs


def pretrained_state(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sd = {k: torch.randn(s, generator=g) for k, s in SHAPES.items()}
    sd["half.weight"] = sd["half.weight"].half()
    sd["ids"] = torch.arange(4)
    return sd


def flat(vector: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([vector[k].reshape(-1) for k in SHAPES])


@pytest.mark.parametrize("chunk", [1, 37, 1000])
def test_linear_methods_stream_like_dense(tmp_path, chunk):
    tvs = task_vectors()
    store = make_store(tmp_path / "tv.zarr", tvs, chunk)
    pre = pretrained_state()
    dense = {"wa": tvs.mean(0), "ta": 0.3 * tvs.sum(0), "neg": -1.0 * tvs.sum(0)}
    got = {"wa": merged("weight_averaging", pre, store), "ta": merged("task_arithmetic", pre, store, lam=0.3),
           "neg": merged("task_negation", pre, store, lam=-1.0)}
    for name, state in got.items():
        expected = apply_vector(pre, {k: v.view(s) for (k, s), v in
                                      zip(SHAPES.items(), dense[name].split([torch.Size(s).numel() for s in SHAPES.values()]))}, 1.0)
        for key in pre:
            torch.testing.assert_close(state[key], expected[key], rtol=1e-5, atol=1e-5, msg=f"{name} {key}")
    coeffs = {key: torch.rand(len(TASKS), generator=torch.Generator().manual_seed(i)) for i, key in enumerate(SHAPES)}
    layer_wise = flat(merge_to_memory(store, Linear(coeffs), budget_mib=1))
    expected = torch.cat([coeffs[k] @ part for k, part in
                          zip(SHAPES, tvs.split([torch.Size(s).numel() for s in SHAPES.values()], dim=1))])
    torch.testing.assert_close(layer_wise, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kind", ["randn", "levels"])
@pytest.mark.parametrize("k", [0, 10, 20, 100])
@pytest.mark.parametrize("merge", ["mean", "sum"])
def test_ties_streams_bit_identical_to_in_memory(tmp_path, kind, k, merge):
    tvs = task_vectors(kind)
    store = make_store(tmp_path / "tv.zarr", tvs, chunk_elems=41)
    spec = registry.method("ties_merging")
    got = flat(spec.run(Inputs({}, store.tasks, store), spec.configure(k=k, merge=merge)).vector())
    assert torch.equal(got, ties_merge(tvs, k, merge, backend="torch"))


def test_compiled_cpu_path_is_bit_identical(tmp_path):
    tvs = task_vectors("levels")
    tvs[:, ::7] *= -1.0
    store = make_store(tmp_path / "tv.zarr", tvs, chunk_elems=41)
    for merge in ("mean", "sum"):
        got = flat(merge_to_memory(store, Ties(20, merge), budget_mib=1, compile=True))
        assert torch.equal(got, ties_merge(tvs, 20, merge, backend="torch")), merge


@pytest.mark.parametrize("sample, band", [(10**9, 0.004), (10**9, 1.0), (30, 0.0), (0, 0.004)])
def test_thresholds_exact_with_sample_miss_and_fallback(tmp_path, sample, band):
    tvs = task_vectors("levels") * torch.linspace(0.5, 2, n_total())  # many ties, uneven scale
    store = make_store(tmp_path / "tv.zarr", tvs, chunk_elems=29)
    reader = Reader(store, budget_mib=1)
    for k in (5, 20, 60):
        got = exact_thresholds(reader, k, sample, band)
        assert torch.equal(got, ties_thresholds(tvs, k, backend="torch")), (k, sample, band)


def test_majority_sign_patched_after_the_apply_pass(tmp_path):
    # mostly negative elected signs, plus entries where kept values cancel exactly
    tvs = -torch.rand(4, n_total(), generator=torch.Generator().manual_seed(3)) - 0.5
    tvs[0, ::5], tvs[1, ::5], tvs[2, ::5], tvs[3, ::5] = 4.0, -4.0, 0.0, 0.0
    store = make_store(tmp_path / "tv.zarr", tvs, chunk_elems=31)
    reducer = Ties(k=60, merge="sum")
    got = flat(merge_to_memory(store, reducer, budget_mib=1))
    assert reducer.patches(), "the test needs exact cancellations under a negative majority"
    assert torch.equal(got, ties_merge(tvs, 60, "sum", backend="torch"))


def test_merge_to_file_writes_every_tensor(tmp_path):
    pre = pretrained_state()
    save_file(pre, tmp_path / "pre.safetensors")
    store = make_store(tmp_path / "tv.zarr", task_vectors(), chunk_elems=23)
    out = tmp_path / "merged.safetensors"
    summary = merge_to_file(store, Scaled(Ties(20, "mean", band=1.0), 0.4), pre, out, budget_mib=1,
                            metadata={"method": "ties"})
    expected = merged("ties_merging", pre, store, k=20, merge="mean", lam=0.4)
    written = load_file(out)
    assert sorted(written) == sorted(pre) and all(torch.equal(written[k], expected[k]) for k in pre)
    assert summary["passes"] == 3 and written["half.weight"].dtype == torch.float16
    assert not list(tmp_path.glob(".merged*"))  # the temporary file was renamed


def test_failed_merge_leaves_no_output(tmp_path):
    pre = pretrained_state()
    store = make_store(tmp_path / "tv.zarr", task_vectors(), chunk_elems=23)
    out = tmp_path / "merged.safetensors"
    with pytest.raises(KeyError, match="layer-wise coefficients lack"):
        merge_to_file(store, Linear({"proj": torch.ones(5)}), pre, out)
    assert not out.exists() and not list(tmp_path.glob(".merged*"))
    del pre["proj"]
    with pytest.raises(KeyError, match="pretrained weights lack tensor 'proj'"):
        merge_to_file(store, Linear([1.0] * 5), pre, out)


def test_budget_too_small_names_the_fix(tmp_path):
    for task in TASKS:
        write_diffs(tmp_path / "tv.zarr", task, [("w", torch.ones(2 * 65536), torch.float32)], "base", "src", 0.25)
    store = TaskVectorStore(tmp_path / "tv.zarr", TASKS)  # blocks of 5 x 0.25 MiB
    assert Reader(store, budget_mib=4).depth == 1
    with pytest.raises(ValueError, match=r"takes 1\.25 MiB, more than half the memory budget of 2 MiB: raise the "
                                         r"budget \(merging\.budget_mib\) or write the store with a smaller "
                                         r"merging\.chunk_mib"):
        Reader(store, budget_mib=2)
    with pytest.raises(ValueError, match=r"takes 1\.25 MiB, more than half the memory budget of 512 KiB"):
        Reader(store, budget_mib=0.5)  # not "takes 1 MiB ... of 0 MiB"
    write_diffs(tmp_path / "small.zarr", "a", [("w", torch.ones(2 * 65536), torch.float32)], "base", "src", 0.125)
    with pytest.raises(ValueError, match=r"a block of 1 task-vector chunks of \S+small\.zarr takes 128 KiB, more "
                                         r"than half the memory budget of 200 KiB"):
        Reader(TaskVectorStore(tmp_path / "small.zarr", ["a"]), budget_mib=200 / 1024)


def test_whole_tensor_blocks(tmp_path, caplog):
    """A reducer with ``whole_tensors`` gets one block per tensor in store order (chunks of 37
    entries read straight into it), equal to the dense values; through Scaled too; a tensor
    over half the budget is read whole with a warning, where chunks that size are refused; a
    per-matrix reducer refuses chunked blocks."""
    from pipeline.merging.streamed import PerMatrix
    from pipeline.store.streaming import run

    tvs = task_vectors()
    store = make_store(tmp_path / "tv.zarr", tvs, chunk_elems=37)
    sizes = [torch.Size(s).numel() for s in SHAPES.values()]
    reader = Reader(store, budget_mib=1, whole_tensors=True)
    blocks = list(reader.blocks())
    reader.close()
    assert [(k, span) for k, span, _ in blocks] == [(k, slice(0, n)) for k, n in zip(SHAPES, sizes)]
    assert torch.equal(torch.cat([b for _, _, b in blocks], dim=1), tvs)

    reducer = Scaled(PerMatrix(lambda t: t.sum(0) * 2), 0.5)  # matrices: the sum; others: the mean
    assert reducer.whole_tensors
    expected = torch.cat([part.sum(0) if len(s) == 2 else 0.5 * part.mean(0) for s, part in
                          zip(SHAPES.values(), tvs.split(sizes, dim=1))])
    assert torch.equal(flat(merge_to_memory(store, reducer, budget_mib=1)), expected)

    n_max = max(sizes) * len(TASKS) * 4 / 2**20  # the largest tensor's block, MiB
    Reader(store, budget_mib=1.5 * n_max, whole_tensors=True).close()
    assert "read whole all the same" in caplog.text
    with pytest.raises(ValueError, match="more than half the memory budget"):
        Reader(store, budget_mib=2 * 37 * len(TASKS) * 4 / 2**20 * 0.9)
    reader = Reader(store, budget_mib=1)
    with pytest.raises(ValueError, match=r"conv\.weight: a per-matrix reducer needs whole tensors, got entries "
                                         r"slice\(0, 33"):
        run(reader, PerMatrix(lambda t: t.sum(0)), lambda *_: None, desc=None)
    reader.close()


@pytest.mark.parametrize("how", ["fp16 overflow", "inf in the pretrained weights"])
def test_non_finite_merges_are_refused_leaving_no_file(tmp_path, how):
    """Checked block by block as the streamed writer writes them (the store's reader refuses
    non-finite task vectors itself)."""
    pre, lam = pretrained_state(), 0.3
    if how == "fp16 overflow":
        lam = 1e6
    else:
        pre["extra"] = torch.tensor([0.0, float("inf")])  # outside the store: copied
    store = make_store(tmp_path / "tv.zarr", task_vectors(), chunk_elems=23)
    out = tmp_path / "merged.safetensors"
    with pytest.raises(ValueError, match=r"refusing to write \S+merged\.safetensors: tensor '[\w.]+(\[\d+:\d+\])?' "
                                         r"contains NaN or Inf \(\d+ of \d+ entries\); the computation diverged"):
        registry.method("task_arithmetic").run(Inputs(pre, TASKS, store), registry.method(
            "task_arithmetic").configure(lam=lam)).save(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tv.zarr"]


def test_a_full_disk_leaves_no_temporary(tmp_path, monkeypatch):
    """ENOSPC mid-merge: the write fails, and so does closing the file (its buffer cannot be
    flushed); the temporary file is removed all the same."""
    import errno

    from pipeline.models.checkpoints import SafetensorsWriter

    store = make_store(tmp_path / "tv.zarr", task_vectors(), chunk_elems=23)
    real_write, calls = SafetensorsWriter.write, []

    def write(self, name, values):
        calls.append(name)
        if len(calls) == 5:
            self.file.close = lambda: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space left on device"))
            raise OSError(errno.ENOSPC, "No space left on device")
        real_write(self, name, values)

    monkeypatch.setattr(SafetensorsWriter, "write", write)
    with pytest.raises(OSError, match="No space left"):
        merge_to_file(store, Linear([0.3] * 5), pretrained_state(), tmp_path / "merged.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tv.zarr"]


PROBE = r"""
import json, os, sys, threading, time, torch
from pipeline.store.task_vectors import TaskVectorStore
from pipeline.merging.streamed import Scaled
from pipeline.merging.ties_merging import Ties
from pipeline.store.streaming import merge_to_file
root, out, mode = sys.argv[1:4]
rss = lambda: int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
warm = TaskVectorStore(root, ["warm"])  # loads the codecs, thread pools and kernels first
merge_to_file(warm, Scaled(Ties(20, "mean"), 0.3), {"w": torch.zeros(warm.shapes["w"])}, out, budget_mib=8)
store = TaskVectorStore(root, [f"t{j}" for j in range(8)])
pre = {"w": torch.zeros(store.shapes["w"])}
start, peak, done = rss(), [0.0], threading.Event()
def sample():  # RSS every millisecond while the merge runs
    while not done.is_set():
        peak[0] = max(peak[0], rss())
        time.sleep(0.001)
probe = threading.Thread(target=sample)
probe.start()
if mode == "dense":  # the in-memory way: all task vectors as one K x N matrix
    dense = torch.cat([b for _, _, b in store.chunks()], dim=1)
else:
    merge_to_file(store, Scaled(Ties(20, "mean"), 0.3), pre, out, budget_mib=8)
done.set()
probe.join()
print(json.dumps({"peak_mib": max(peak[0], rss()) - start}))
"""


def test_memory_budget_respected(tmp_path):
    """Peak RSS growth (sampled, in a fresh process) of streaming TIES with an 8 MiB budget on 8 task
    vectors of 1M and of 4M entries (32 and 128 MiB): far below the dense K x N matrix, and
    nearly the same for both sizes."""
    peaks = {}
    for n in (2**20, 2**22):
        root = tmp_path / f"tv{n}.zarr"
        for j in range(8):
            g = torch.Generator().manual_seed(j)
            write_diffs(root, f"t{j}", [("w", torch.randn(n, generator=g), torch.float32)], "base", "src", 0.25)
        write_diffs(root, "warm", [("w", torch.randn(70_000), torch.float32)], "base", "src", 0.25)
        for mode in ("dense", "stream"):
            run = subprocess.run([sys.executable, "-c", PROBE, str(root), str(tmp_path / "m.safetensors"), mode],
                                 capture_output=True, text=True, cwd=REPO, check=True)
            peaks[mode, n] = json.loads(run.stdout.strip().splitlines()[-1])["peak_mib"]
    assert peaks["dense", 2**22] >= 128, peaks  # the probe sees the dense matrix
    assert peaks["stream", 2**22] < 0.4 * peaks["dense", 2**22], peaks
    assert peaks["stream", 2**22] - peaks["stream", 2**20] < 16, peaks  # independent of the size
