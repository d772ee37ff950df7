"""The zarr task-vector store: contents, refusals, atomic writes, chunk streaming and storage
formats."""
import pytest
import torch
from helpers.store import CHUNK, CHUNK_MIB, TASKS, encoder_state, finetune, make_store, task_vectors
from safetensors.torch import save_file

import pipeline.store.task_vectors as tv
from pipeline.store.task_vectors import Storage, TaskVectorStore, write_task_vector


def build(tmp_path, tasks=("a", "b", "c"), pre=None):
    pre = pre or encoder_state()
    fts = {}
    for i, t in enumerate(tasks):
        fts[t] = finetune(pre, i + 1)
        save_file(fts[t], tmp_path / f"{t}.safetensors")
        write_task_vector(tmp_path / "tv.zarr", t, pre, fts[t], tmp_path / f"{t}.safetensors", CHUNK_MIB)
    return pre, fts


def test_contents_and_attributes(tmp_path):
    pre, fts = build(tmp_path)
    store = TaskVectorStore(tmp_path / "tv.zarr", ["a", "b", "c"])
    assert store.keys == [k for k in pre if k != "ids"]  # state-dict order, floating tensors only
    assert store.shapes["half.weight"] == (5, 13) and store.dtypes["half.weight"] == torch.float16
    full = {k: torch.zeros((3, *s)) for k, s in store.shapes.items()}
    for key, span, block in store.chunks():
        full[key].view(3, -1)[:, span] = block
    for j, t in enumerate("abc"):
        for k in store.keys:
            assert torch.equal(full[k][j], fts[t][k].float() - pre[k].float())
    from pipeline.models.checkpoints import sha256_file, state_dict_hash
    assert store.base_hash == state_dict_hash(pre)
    assert store.describe()["sources"]["b"] == sha256_file(tmp_path / "b.safetensors")


def test_streaming_never_holds_all_task_vectors(tmp_path):
    build(tmp_path)
    store = TaskVectorStore(tmp_path / "tv.zarr", ["a", "b", "c"])
    sizes = [block.numel() for _, _, block in store.chunks()]
    assert max(sizes) <= 3 * CHUNK < store.numel()
    assert sum(sizes) == 3 * store.numel()


def test_refuses_base_hash_mismatch_naming_both(tmp_path):
    pre, _ = build(tmp_path, ("a", "b"))
    other = encoder_state(seed=9)
    ft = finetune(other, 3)
    save_file(ft, tmp_path / "z.safetensors")
    write_task_vector(tmp_path / "tv.zarr", "z", other, ft, tmp_path / "z.safetensors", CHUNK_MIB)
    with pytest.raises(ValueError, match=r"task 'z'.*task 'a'.*different pretrained models"):
        TaskVectorStore(tmp_path / "tv.zarr", ["a", "z"])
    with pytest.raises(ValueError, match="the given pretrained encoder"):
        TaskVectorStore(tmp_path / "tv.zarr", ["z"], base_hash=TaskVectorStore(tmp_path / "tv.zarr", ["a"]).base_hash)


def test_refuses_nan_naming_task_and_key(tmp_path):
    pre = encoder_state()
    ft = finetune(pre, 1)
    ft["ln.bias"][3] = float("nan")
    save_file(ft, tmp_path / "a.safetensors")
    with pytest.raises(ValueError, match=r"task 'a'.*'ln.bias'.*NaN or Inf"):
        write_task_vector(tmp_path / "tv.zarr", "a", pre, ft, tmp_path / "a.safetensors", CHUNK_MIB)
    assert not (tmp_path / "tv.zarr" / "a").exists()


def test_refuses_shape_mismatch_naming_both(tmp_path):
    pre = encoder_state()
    ft = finetune(pre, 1)
    ft["ln.bias"] = torch.zeros(9)
    save_file(ft, tmp_path / "a.safetensors")
    with pytest.raises(ValueError, match=r"task 'a'.*does not match the pretrained encoder at 'ln.bias'.*\(9,\).*\(7,\)"):
        write_task_vector(tmp_path / "tv.zarr", "a", pre, ft, tmp_path / "a.safetensors", CHUNK_MIB)
    # two stores of different architectures: refused when combined, naming both tasks
    build(tmp_path, ("b",))
    small = {k: v for k, v in encoder_state().items() if k != "ln.bias"}
    ft = finetune(small, 2)
    save_file(ft, tmp_path / "s.safetensors")
    write_task_vector(tmp_path / "tv2.zarr", "s", small, ft, tmp_path / "s.safetensors", CHUNK_MIB)
    (tmp_path / "tv2.zarr" / "s").rename(tmp_path / "tv.zarr" / "s")
    with pytest.raises(ValueError, match=r"task 's' and task 'b' differ in tensors or shapes at \['ln.bias'\]"):
        TaskVectorStore(tmp_path / "tv.zarr", ["b", "s"])


def test_killed_write_leaves_nothing_trusted(tmp_path, monkeypatch):
    pre, _ = build(tmp_path, ("a",))
    ft = finetune(pre, 5)
    save_file(ft, tmp_path / "b.safetensors")
    calls = []
    real = tv.check_finite

    def dies_midway(sd, name):  # the job is killed after two tensors were written
        calls.append(name)
        if len(calls) == 4:
            raise KeyboardInterrupt("killed")
        real(sd, name)

    monkeypatch.setattr(tv, "check_finite", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        write_task_vector(tmp_path / "tv.zarr", "b", pre, ft, tmp_path / "b.safetensors", CHUNK_MIB)
    assert not (tmp_path / "tv.zarr" / "b").exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")) == []
    with pytest.raises(FileNotFoundError, match="task 'b'.*missing or incomplete.*snakemake"):
        TaskVectorStore(tmp_path / "tv.zarr", ["a", "b"])


def test_incomplete_subgroup_is_not_trusted(tmp_path):
    build(tmp_path, ("a", "b"))
    import zarr
    zarr.open_group(str(tmp_path / "tv.zarr" / "b"), mode="r+").attrs["complete"] = False  # e.g. a partial copy
    with pytest.raises(FileNotFoundError, match="task 'b'.*incomplete"):
        TaskVectorStore(tmp_path / "tv.zarr", ["a", "b"])


def test_rewrite_replaces_a_task(tmp_path):
    pre, _ = build(tmp_path, ("a",))
    ft = finetune(pre, 7)
    save_file(ft, tmp_path / "a.safetensors")
    write_task_vector(tmp_path / "tv.zarr", "a", pre, ft, tmp_path / "a.safetensors", CHUNK_MIB)
    (_, _, block), *_ = TaskVectorStore(tmp_path / "tv.zarr", ["a"]).chunks()
    assert torch.equal(block[0], (ft["conv1.weight"] - pre["conv1.weight"]).reshape(-1)[: len(block[0])])


def test_rewrite_removes_temporaries_left_by_a_sigkill(tmp_path):
    pre, fts = build(tmp_path, ("a",))
    stale = tmp_path / ".tv.zarr.a.x1y2.tmp"  # what a SIGKILL during a write leaves behind
    (stale / "conv1.weight").mkdir(parents=True)
    other = tmp_path / ".tv.zarr.b.x1y2.tmp"  # another task's write: not ours to remove
    other.mkdir()
    write_task_vector(tmp_path / "tv.zarr", "a", pre, fts["a"], tmp_path / "a.safetensors", CHUNK_MIB)
    assert not stale.exists() and other.exists()


@pytest.mark.parametrize("storage", [Storage("float32", "zstd", 3), Storage("float32", "blosc", 5),
                                     Storage("float16"), Storage("bfloat16", "zstd")], ids=str)
def test_storage_formats_round_trip(tmp_path, storage):
    tvs = task_vectors()
    store = make_store(tmp_path / "tv.zarr", tvs, chunk_elems=50, storage=storage)
    got = torch.stack([torch.cat([b[j] for _, _, b in store.chunks()]) for j in range(len(TASKS))])
    expected = tvs if storage.dtype == "float32" else tvs.to(getattr(torch, storage.dtype)).float()
    assert torch.equal(got, expected)
    with pytest.raises(ValueError, match="storage codec 'lz5' unknown"):
        Storage(codec="lz5")
