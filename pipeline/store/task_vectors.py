"""The zarr task-vector store of a zoo.

    results/{zoo}/task_vectors.zarr/            zarr v3 group
    results/{zoo}/task_vectors.zarr/{task}/     one subgroup per task, attributes:
        task, base_hash (state_dict_hash of the pretrained encoder), source_sha256 (of the
        fine-tuned checkpoint), chunk_elements, keys (state-dict order), complete (written last)
    results/{zoo}/task_vectors.zarr/{task}/{key}  one flat array per floating tensor of the
        image encoder, named by its state-dict key, chunked into ``chunk_elements`` entries;
        attributes: shape and dtype of the source tensor

A task vector is fine-tuned minus pretrained, computed in fp32 and stored as :class:`Storage`
says: fp32 (default), fp16 or bf16 (kept as its uint16 bit patterns, zarr has no bfloat16),
uncompressed (default), zstd or blosc. Readers always get fp32. A subgroup is written under a
temporary name next to the store and renamed into place, and readers accept only subgroups
whose ``complete`` attribute is set, so a killed writer leaves nothing a reader trusts.
:class:`TaskVectorStore` streams the K task vectors chunk by chunk.
"""

from __future__ import annotations

import functools
import math
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import zarr
import zarr.storage
from tqdm import tqdm

from pipeline.io import atomic_path
from pipeline.models.checkpoints import check_compatible, check_finite, sha256_file, state_dict_hash

DEFAULT_CHUNK_MIB = 4.0
DTYPES = {"float32": ("float32", 4), "float16": ("float16", 2), "bfloat16": ("uint16", 2)}  # zarr dtype, bytes
CODECS = ("none", "zstd", "blosc")


@dataclass(frozen=True)
class Storage:
    """How task vectors are stored: element type, compression codec and its level."""

    dtype: str = "float32"
    codec: str = "none"
    level: int = 3

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise ValueError(f"task-vector storage dtype {self.dtype!r} unknown; choose one of {sorted(DTYPES)}")
        if self.codec not in CODECS:
            raise ValueError(f"task-vector storage codec {self.codec!r} unknown; choose one of {CODECS}")

    @property
    def itemsize(self) -> int:
        return DTYPES[self.dtype][1]

    def compressors(self) -> list | None:
        from zarr.codecs import BloscCodec, ZstdCodec

        if self.codec == "zstd":
            return [ZstdCodec(level=self.level)]
        if self.codec == "blosc":
            return [BloscCodec(cname="zstd", clevel=self.level, shuffle="shuffle", typesize=self.itemsize)]
        return None

    def encode(self, x: torch.Tensor) -> np.ndarray:
        """fp32 tensor -> the array's numpy values."""
        if self.dtype == "bfloat16":
            return x.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
        return x.to(getattr(torch, self.dtype)).numpy()

    def decode(self, values: np.ndarray) -> torch.Tensor:
        """The array's numpy values -> fp32 tensor."""
        if self.dtype == "bfloat16":
            return torch.from_numpy(values.view(np.int16)).view(torch.bfloat16).float()
        return torch.from_numpy(values).float()


def chunk_elements(chunk_mib: float, itemsize: int = 4) -> int:
    """Entries per chunk for a chunk size in MiB and an element size in bytes."""
    if chunk_mib <= 0:
        raise ValueError(f"chunk size must be positive, got {chunk_mib} MiB")
    return max(1, int(chunk_mib * 2**20) // itemsize)


def _ensure_root(root: Path) -> None:
    """Create the store's root group metadata atomically (concurrent writers agree on it, so
    none removes another's temporary file)."""
    root.mkdir(parents=True, exist_ok=True)
    if (root / "zarr.json").exists():
        return
    metadata: dict = {}
    zarr.open_group(zarr.storage.MemoryStore(metadata), mode="w", attributes={"content": "task vectors"})
    with atomic_path(root / "zarr.json", dir=root.parent, prefix=f".{root.name}.root.", exclusive=False) as tmp:
        tmp.write_bytes(metadata["zarr.json"].to_bytes())


def write_task_vector(root: str | Path, task: str, pretrained: Mapping[str, torch.Tensor],
                      finetuned: Mapping[str, torch.Tensor], source: str | Path,
                      chunk_mib: float = DEFAULT_CHUNK_MIB, storage: Storage = Storage()) -> Path:
    """Write ``finetuned - pretrained`` (floating tensors of the image encoder) as the
    subgroup ``task`` of the store at ``root``; returns the subgroup's path.

    Refuses checkpoints whose keys, shapes or dtypes differ from ``pretrained`` and task
    vectors with NaN or Inf, naming the task and the tensor.
    """
    source = Path(source)
    check_compatible(pretrained, finetuned, "the pretrained encoder", f"task {task!r} ({source})")
    check_finite(finetuned, f"task {task!r} ({source})")

    def diffs():
        for key, base in pretrained.items():
            if base.is_floating_point():
                diff = finetuned[key].float() - base.float()
                check_finite({key: diff}, f"task vector of task {task!r}")
                yield key, diff, base.dtype

    return write_diffs(root, task, diffs(), state_dict_hash(pretrained), sha256_file(source), chunk_mib, storage)


def write_diffs(root: str | Path, task: str, diffs: Iterable[tuple[str, torch.Tensor, torch.dtype]],
                base_hash: str, source_sha256: str, chunk_mib: float = DEFAULT_CHUNK_MIB,
                storage: Storage = Storage()) -> Path:
    """Write one task's vector from ``(key, fp32 difference, source dtype)`` items, one tensor
    in memory at a time, atomically (a temporary subgroup beside the store, then a rename; one
    left by a killed earlier write of the task is removed first)."""
    root = Path(root)
    _ensure_root(root)
    final = root / task
    n_chunk = chunk_elements(chunk_mib, storage.itemsize)
    with atomic_path(final, directory=True, dir=root.parent, prefix=f".{root.name}.{task}.") as tmp:
        group = zarr.open_group(str(tmp), mode="w", attributes={
            "task": task, "base_hash": base_hash, "source_sha256": source_sha256,
            "chunk_elements": n_chunk, "storage": asdict(storage)})
        keys = []
        for key, diff, dtype in tqdm(diffs, desc=f"task vector {task}", mininterval=2):
            n = max(diff.numel(), 1)
            array = group.create_array(key, shape=(diff.numel(),), dtype=DTYPES[storage.dtype][0],
                                       chunks=(math.ceil(n / math.ceil(n / n_chunk)),),  # even: no padded edge chunk
                                       compressors=storage.compressors(), fill_value=0,
                                       attributes={"shape": list(diff.shape),
                                                   "dtype": str(dtype).removeprefix("torch.")})
            array[:] = storage.encode(diff.reshape(-1))
            keys.append(key)
        group.attrs.update({"keys": keys, "complete": True})  # last: readers trust only complete subgroups
    return final


class TaskVectorStore:
    """Read access to the task vectors of ``tasks`` in the store at ``root``.

    Checks on opening that every subgroup is complete, that all share one base model (and
    equal ``base_hash`` when given) and that their keys and shapes agree.
    """

    def __init__(self, root: str | Path, tasks: Sequence[str], base_hash: str | None = None):
        self.root = Path(root)
        if not tasks:
            raise ValueError("no tasks given to read from the task-vector store")
        self.tasks = list(tasks)
        self.groups = {t: self._open(t) for t in self.tasks}
        first = self.tasks[0]
        ref_hash = base_hash or self.groups[first].attrs["base_hash"]
        ref_name = "the given pretrained encoder" if base_hash else f"task {first!r}"
        ref_arrays = self._arrays(first)
        for task in self.tasks:
            arrays = self._arrays(task)
            if arrays != ref_arrays:
                diff = sorted(k for k in set(arrays) | set(ref_arrays) if arrays.get(k) != ref_arrays.get(k))
                raise ValueError(
                    f"task vectors of task {task!r} and task {first!r} differ in tensors or shapes at "
                    f"{diff[:5]}: {task!r} has {[arrays.get(k) for k in diff[:5]]}, {first!r} has "
                    f"{[ref_arrays.get(k) for k in diff[:5]]}; both must come from one architecture")
            got = self.groups[task].attrs["base_hash"]
            if got != ref_hash:
                raise ValueError(
                    f"task vectors of task {task!r} (base model hash {got[:12]}) and {ref_name} "
                    f"(base model hash {ref_hash[:12]}) come from different pretrained models and "
                    f"cannot be combined; rebuild {self.root / task} from the zoo's pretrained model")
        self.base_hash = ref_hash
        self.storage = {t: Storage(**self.groups[t].attrs.get("storage", {})) for t in self.tasks}
        self.shapes = {k: tuple(shape) for k, (shape, _) in ref_arrays.items()}
        self.dtypes = {k: getattr(torch, dtype) for k, (_, dtype) in ref_arrays.items()}
        self.keys = list(self.shapes)

    def _open(self, task: str) -> zarr.Group:
        path = self.root / task
        try:
            group = zarr.open_group(str(path), mode="r")
        except FileNotFoundError:
            group = None
        if group is None or not group.attrs.get("complete", False):
            raise FileNotFoundError(
                f"task vector of task {task!r} at {path} is missing or incomplete (a killed write); "
                f"rebuild it with `snakemake {path}`")
        return group

    def _arrays(self, task: str) -> dict[str, tuple[list[int], str]]:
        group = self.groups[task]
        return {key: (group[key].attrs["shape"], group[key].attrs["dtype"]) for key in group.attrs["keys"]}

    def numel(self) -> int:
        """Entries d of one full task vector."""
        return sum(int(np.prod(s)) for s in self.shapes.values())

    def chunks(self, device: torch.device | str | None = None, tasks: Sequence[str] | None = None,
               progress: str | None = None) -> Iterator[tuple[str, slice, torch.Tensor]]:
        """Yield ``(key, flat slice, (K, n) fp32 tensor)`` over every tensor chunk by chunk,
        K = len(tasks) (default all). Only one chunk per task is in memory at a time.
        Refuses NaN or Inf, naming task and tensor."""
        tasks = self.tasks if tasks is None else list(tasks)
        for key, span in self.spans(progress):
            block = self.read_block(key, span, tasks)
            yield key, span, block.to(device) if device is not None else block

    def spans(self, progress: str | None = None) -> Iterator[tuple[str, slice]]:
        """``(key, flat slice)`` of every chunk, in store order (chunks of the first task)."""
        keys = tqdm(self.keys, desc=progress, mininterval=2) if progress else self.keys
        for key in keys:
            array = self._array(self.tasks[0], key)
            size, step = array.shape[0], array.chunks[0]
            for start in range(0, size, step):
                yield key, slice(start, min(start + step, size))

    def read_block(self, key: str, span: slice, tasks: Sequence[str] | None = None) -> torch.Tensor:
        """The (K, n) fp32 values of ``key[span]`` of ``tasks`` (default all); refuses NaN or
        Inf, naming task and tensor."""
        tasks = self.tasks if tasks is None else tasks
        block = torch.empty((len(tasks), span.stop - span.start), dtype=torch.float32)
        for row, task in zip(block, tasks):
            if not self._read_raw(task, key, span, row):
                row.copy_(self.storage[task].decode(self._array(task, key)[span]))
        if not bool(torch.isfinite(block.sum())):  # NaN and Inf reach the sum (a cheap first test)
            bad = [t for t, row in zip(tasks, block) if not bool(torch.isfinite(row).all())]
            if bad:
                raise ValueError(f"task vector of task {bad[0]!r} has NaN or Inf in tensor {key!r} "
                                 f"({self.root / bad[0]}); rebuild it from a finite checkpoint")
        return block

    @functools.cache
    def _array(self, task: str, key: str) -> zarr.Array:
        return self.groups[task][key]

    @functools.cache
    def _layout(self, task: str, key: str) -> tuple[bool, int, Callable]:
        """Whether the array's chunk files are plain (uncompressed, native byte order), its
        chunk length and its chunk-key encoder (read once per array)."""
        array = self._array(task, key)
        meta = array.metadata
        plain = (len(meta.codecs) == 1 and type(meta.codecs[0]).__name__ == "BytesCodec"
                 and getattr(meta.codecs[0].endian, "value", None) == sys.byteorder)
        return plain, array.chunks[0], meta.chunk_key_encoding.encode_chunk_key

    def _read_raw(self, task: str, key: str, span: slice, out: torch.Tensor) -> bool:
        """Read one uncompressed chunk file straight into ``out`` (16-bit types through a
        buffer, then converted): no zarr decode, the GIL released while reading, so reader
        threads overlap. False where that does not apply."""
        plain, step, chunk_key = self._layout(task, key)
        if not plain or span.start % step or span.stop - span.start > step:
            return False
        dtype = self.storage[task].dtype
        target = out if dtype == "float32" else torch.empty(len(out), dtype=torch.int16)
        try:
            with open(self.root / task / key / chunk_key((span.start // step,)), "rb", buffering=0) as f:
                view = memoryview(target.numpy()).cast("B")
                got = 0
                while got < len(view) and (n := f.readinto(view[got:])):
                    got += n
        except FileNotFoundError:  # a chunk never written holds the fill value
            out.zero_()
            return True
        if target is not out:
            out.copy_(target.view(getattr(torch, dtype)))
        return got == len(view)

    def nbytes(self) -> int:
        """Bytes of the stored arrays' chunk files on disk (what one full read reads)."""
        return sum(f.stat().st_size for t in self.tasks for f in (self.root / t).rglob("*") if f.is_file()
                   and f.name != "zarr.json")

    def describe(self) -> dict:
        """Provenance of the store's subgroups (for settings files)."""
        return {"store": str(self.root), "base_hash": self.base_hash,
                "sources": {t: self.groups[t].attrs["source_sha256"] for t in self.tasks}}

