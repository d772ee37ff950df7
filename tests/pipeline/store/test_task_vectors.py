"""The zarr task-vector store: contents, refusals, atomic writes, chunk streaming, storage
formats and integrity (chunk checksums, source checkpoints, the rebuild command)."""
import re
import shutil
from pathlib import Path

import pytest
import torch
import zarr
from helpers.store import CHUNK, CHUNK_MIB, TASKS, encoder_state, finetune, make_store, task_vectors
from helpers.workflow import snakemake
from safetensors.torch import save_file

import pipeline.store.task_vectors as tv
from pipeline.store.streaming import Linear, merge_to_memory
from pipeline.store.task_vectors import Storage, TaskVectorStore, rebuild_hint, write_task_vector


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


@pytest.mark.parametrize("value", [False, "false", "true", 1, None])
def test_only_json_true_marks_a_subgroup_complete(tmp_path, value):
    build(tmp_path, ("a", "b"))
    zarr.open_group(str(tmp_path / "tv.zarr" / "b"), mode="r+").attrs["complete"] = value  # e.g. a partial copy
    with pytest.raises(FileNotFoundError, match=rf"task 'b'.*incomplete.*snakemake --force {tmp_path}/tv.zarr/b"):
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


# ---- integrity: every chunk verified, foreign data refused, the fix named ---------------------

STORAGES = [Storage(), Storage("bfloat16"), Storage("float32", "zstd")]


def chunk_file(root: Path, task: str, key: str, index: int) -> Path:
    return root / task / key / "c" / str(index)


def refusal(root: Path, task: str, key: str, index: int, problem: str) -> str:
    """The pattern of a refused chunk's error: chunk, tensor, task, file, problem, fix."""
    file, fix = re.escape(str(chunk_file(root, task, key, index))), re.escape(rebuild_hint(root / task))
    return rf"chunk {index} of tensor '{key}' of task '{task}' \({file}\) {problem}.*; {fix}$"


def read_all(store: TaskVectorStore) -> torch.Tensor:
    return torch.cat([block for _, _, block in store.chunks()], dim=1)


@pytest.mark.parametrize("storage", STORAGES, ids=str)
def test_deleted_chunk_is_refused_not_merged_as_zeros(tmp_path, storage):
    root = tmp_path / "tv.zarr"
    store = make_store(root, task_vectors(k=2), chunk_elems=50, storage=storage)
    chunk_file(root, "b", "attn.in_proj_weight", 3).unlink()
    with pytest.raises(ValueError, match=refusal(root, "b", "attn.in_proj_weight", 3, "is missing")):
        merge_to_memory(store, Linear([0.5, 0.5]), budget_mib=1)


def test_zero_chunks_are_written_and_read_back(tmp_path):
    tvs = task_vectors(k=1)
    tvs[0, :100] = 0.0  # the first two chunks of conv.weight: a tensor fine-tuning left unchanged
    store = make_store(tmp_path / "tv.zarr", tvs, chunk_elems=50)
    assert chunk_file(tmp_path / "tv.zarr", "a", "conv.weight", 0).is_file()  # not left to the fill value
    assert torch.equal(read_all(store), tvs)


@pytest.mark.parametrize("storage", STORAGES, ids=str)
def test_flipped_bytes_in_a_chunk_are_refused(tmp_path, storage):
    root = tmp_path / "tv.zarr"
    store = make_store(root, task_vectors(k=2), chunk_elems=50, storage=storage)
    file = chunk_file(root, "a", "proj", 1)
    data = bytearray(file.read_bytes())
    data[len(data) // 2] ^= 0x10
    file.write_bytes(data)
    problem = "(fails its checksum|cannot be decoded)" if storage.codec != "none" else "fails its checksum"
    with pytest.raises(ValueError, match=refusal(root, "a", "proj", 1, problem)):
        read_all(store)


def test_chunk_copied_from_another_task_or_tensor_is_refused(tmp_path):
    root = tmp_path / "tv.zarr"
    make_store(root, task_vectors(k=3), chunk_elems=50)
    shutil.copy(chunk_file(root, "b", "proj", 1), chunk_file(root, "a", "proj", 1))  # same tensor, same index
    with pytest.raises(ValueError, match=refusal(root, "a", "proj", 1, "fails its checksum.*another task vector")):
        read_all(TaskVectorStore(root, ["a"]))
    shutil.copy(chunk_file(root, "b", "proj", 0), chunk_file(root, "b", "proj", 1))  # another chunk of its own
    with pytest.raises(ValueError, match=refusal(root, "b", "proj", 1, "fails its checksum")):
        read_all(TaskVectorStore(root, ["b"]))
    shutil.rmtree(root / "c")
    shutil.copytree(root / "b", root / "c")  # a whole subgroup under another task's name
    with pytest.raises(ValueError, match=r"tv.zarr/c holds the task vector of task 'b', not of task 'c'.*--force"):
        TaskVectorStore(root, ["a", "c"])


@pytest.mark.parametrize("storage", STORAGES, ids=str)
def test_truncated_chunk_names_task_tensor_file_and_fix(tmp_path, storage):
    root = tmp_path / "tv.zarr"
    store = make_store(root, task_vectors(k=3), chunk_elems=50, storage=storage)
    file = chunk_file(root, "c", "attn.in_proj_weight", 2)
    data = file.read_bytes()
    file.write_bytes(data[:-10])
    problem = "cannot be decoded" if storage.codec != "none" else rf"has {len(data) - 10} bytes, expected {len(data)}"
    with pytest.raises(ValueError, match=refusal(root, "c", "attn.in_proj_weight", 2, problem)):
        read_all(store)


def test_missing_or_unreadable_metadata_names_task_tensor_file_and_fix(tmp_path):
    root = tmp_path / "tv.zarr"
    make_store(root, task_vectors(k=2))
    (root / "b" / "proj" / "zarr.json").unlink()
    fix = re.escape(rebuild_hint(root / "b"))
    with pytest.raises(ValueError, match=rf"task 'b': the metadata of tensor 'proj', {root}/b/proj/zarr.json, is "
                                         rf"missing.*; {fix}$"):
        TaskVectorStore(root, ["a", "b"])
    (root / "b" / "zarr.json").write_text("{")
    with pytest.raises(ValueError, match=rf"task 'b': {root}/b/zarr.json is unreadable.*; {fix}$"):
        TaskVectorStore(root, ["a", "b"])


def test_store_without_checksums_is_refused_with_the_rebuild_command(tmp_path):
    root = tmp_path / "tv.zarr"
    make_store(root, task_vectors(k=2))
    del zarr.open_group(str(root / "a"), mode="r+").attrs["checksum"]  # as written before checksums
    with pytest.raises(ValueError, match=rf"task 'a'.*no crc32c chunk checksums.*older version.*"
                                         rf"{re.escape(rebuild_hint(root / 'a'))}$"):
        TaskVectorStore(root, ["a", "b"])
    group = zarr.open_group(str(root / "b"), mode="r+")
    group["proj"].attrs["checksums"] = group["proj"].attrs["checksums"][:-1]
    with pytest.raises(ValueError, match=r"task 'b': tensor 'proj' has \d+ chunk checksums for \d+ chunks"):
        TaskVectorStore(root, ["b"])


def test_tasks_of_other_chunks_and_types_read_together(tmp_path):
    tvs = task_vectors(k=2)
    make_store(tmp_path / "tv.zarr", tvs, chunk_elems=50)
    make_store(tmp_path / "other.zarr", tvs, chunk_elems=23, storage=Storage("bfloat16"))
    shutil.rmtree(tmp_path / "tv.zarr" / "b")
    (tmp_path / "other.zarr" / "b").rename(tmp_path / "tv.zarr" / "b")  # spans of a straddle chunks of b
    got = read_all(TaskVectorStore(tmp_path / "tv.zarr", ["a", "b"]))
    assert torch.equal(got, torch.stack([tvs[0], tvs[1].bfloat16().float()]))


def test_verify_source_refuses_another_checkpoint(tmp_path):
    pre, _ = build(tmp_path, ("a", "b"))
    store = TaskVectorStore(tmp_path / "tv.zarr", ["a", "b"])
    store.verify_source("a", tmp_path / "a.safetensors")
    fix = re.escape(rebuild_hint(tmp_path / "tv.zarr" / "a"))
    with pytest.raises(ValueError, match=rf"task 'a' .* sha256 \w{{12}}, but {tmp_path}/b.safetensors has sha256 "
                                         rf"\w{{12}}.*another task's; {fix}$"):
        store.verify_source("a", tmp_path / "b.safetensors")
    save_file(finetune(pre, 9), tmp_path / "a.safetensors")  # fine-tuned again after the task vector
    with pytest.raises(ValueError, match="the checkpoint changed after the task vector was written"):
        store.verify_source("a", tmp_path / "a.safetensors")


def test_the_rebuild_command_reruns_exactly_that_job(tmp_path, monkeypatch):
    """The command of the refusals reruns the job of a present output (where `snakemake PATH`
    has nothing to do), and no other: on a workflow with the task_vector rule's output form."""
    monkeypatch.chdir(tmp_path)
    assert rebuild_hint(tmp_path / "tv.zarr" / "a") == rebuild_hint(Path("tv.zarr/a"))  # Snakemake's relative targets
    (tmp_path / "Snakefile").write_text('rule task_vector:\n    output:\n        directory("tv.zarr/{task}"),\n'
                                        '    shell:\n        "mkdir -p {output}"\n')
    snakemake("--cores", "1", "tv.zarr/a", "tv.zarr/b", cwd=tmp_path, repo=tmp_path)
    plain = snakemake("-n", "--cores", "1", "tv.zarr/a", cwd=tmp_path, repo=tmp_path)
    assert "Nothing to be done" in plain.stdout + plain.stderr
    command = re.fullmatch(r"rebuild it with `snakemake (.*)` \(and the run's --configfile\)",
                           rebuild_hint(Path("tv.zarr/a"))).group(1).split()
    plan = snakemake("-n", "--cores", "1", *command, cwd=tmp_path, repo=tmp_path)
    text = plan.stdout + plan.stderr
    assert re.search(r"task_vector\s+1\n", text) and "wildcards: task=a" in text and "task=b" not in text, text
