"""The zarr task-vector store of a zoo.

    results/{zoo}/task_vectors.zarr/            zarr v3 group
    results/{zoo}/task_vectors.zarr/{task}/     one subgroup per task, attributes:
        task, base_hash (state_dict_hash of the pretrained encoder), source_sha256 (of the
        fine-tuned checkpoint), chunk_elements, storage, checksum ("crc32c"), keys (state-dict
        order), complete (JSON true, written last)
    results/{zoo}/task_vectors.zarr/{task}/{key}  one flat array per floating tensor of the
        image encoder, named by its state-dict key, chunked into ``chunk_elements`` entries;
        attributes: shape and dtype of the source tensor, checksums (one per chunk)

A task vector is fine-tuned minus pretrained, computed in fp32 and stored as :class:`Storage`
says: fp32 (default), fp16 or bf16 (kept as its uint16 bit patterns, zarr has no bfloat16),
uncompressed (default), zstd or blosc. Readers always get fp32. A subgroup is written under a
temporary name next to the store and renamed into place, and readers accept only subgroups
whose ``complete`` attribute is true, so a killed writer leaves nothing a reader trusts.
Every chunk has a file (zero chunks too) and a CRC-32C of its stored element bytes seeded with
its identity (task, base and source hashes, tensor, chunk index), verified on every read: a
missing, truncated, corrupted or foreign chunk is refused, naming its file and the command
that rebuilds the task vector. :class:`TaskVectorStore` streams the K task vectors chunk by
chunk.
"""

from __future__ import annotations

import functools
import math
import os
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

import google_crc32c  # a dependency of zarr; faster than zlib.crc32 (docs/benchmarks.md)
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
CHECKSUM = "crc32c"  # of each chunk, written as the subgroup's ``checksum`` attribute


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


def chunk_checksum(identity: str, index: int, values: np.ndarray) -> int:
    """CRC-32C of a chunk's element bytes (little-endian), seeded with ``identity`` (see
    :func:`chunk_identity`) and the chunk's index, so that a chunk from elsewhere fails it."""
    data = np.ascontiguousarray(values, dtype=values.dtype.newbyteorder("<"))
    return google_crc32c.extend(google_crc32c.value(f"{identity}\0{index}".encode()), data)


def chunk_identity(task: str, base_hash: str, source_sha256: str, key: str) -> str:
    """What a chunk's checksum binds it to, besides its index."""
    return "\0".join((task, base_hash, source_sha256, key))


def rebuild_hint(path: Path) -> str:
    """The command that rebuilds the task-vector subgroup at ``path`` (a forced rerun of its job:
    plain ``snakemake PATH`` does nothing while the output exists), the path relative to the
    working directory where it lies inside (Snakemake matches no absolute targets)."""
    try:
        path = path.absolute().relative_to(Path.cwd())
    except ValueError:
        pass
    return f"rebuild it with `snakemake --force {path}` (and the run's --configfile)"


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
            "chunk_elements": n_chunk, "storage": asdict(storage), "checksum": CHECKSUM})
        keys = []
        for key, diff, dtype in tqdm(diffs, desc=f"task vector {task}", mininterval=2):
            n = max(diff.numel(), 1)
            step = math.ceil(n / math.ceil(n / n_chunk))  # near-even: little padding in the edge chunk
            values = storage.encode(diff.reshape(-1))
            identity = chunk_identity(task, base_hash, source_sha256, key)
            checksums = [chunk_checksum(identity, i, values[start:start + step])
                         for i, start in enumerate(range(0, len(values), step))]
            array = group.create_array(key, shape=(diff.numel(),), dtype=DTYPES[storage.dtype][0], chunks=(step,),
                                       compressors=storage.compressors(), fill_value=0,
                                       config={"write_empty_chunks": True},  # a missing chunk file is an error
                                       attributes={"shape": list(diff.shape), "checksums": checksums,
                                                   "dtype": str(dtype).removeprefix("torch.")})
            array[:] = values
            keys.append(key)
        group.attrs.update({"keys": keys, "complete": True})  # last: readers trust only complete subgroups
    return final


class _Layout(NamedTuple):
    """How the chunks of one array of one task are read and verified."""

    plain: bool  # uncompressed chunk files in native byte order: read straight into tensors
    step: int  # entries per chunk
    chunk_key: Callable  # chunk coordinates -> chunk file name under the array's folder
    checksums: list[int]
    identity: str


class TaskVectorStore:
    """Read access to the task vectors of ``tasks`` in the store at ``root``.

    Checks on opening that every subgroup is complete, holds the task it is named after, has
    chunk checksums and the metadata of every tensor, that all share one base model (and
    equal ``base_hash`` when given) and that their keys and shapes agree. Every read verifies
    the checksum of each chunk it reads.
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
        except ValueError as err:  # zarr.json is no JSON
            raise ValueError(f"task vector of task {task!r}: {path / 'zarr.json'} is unreadable ({err}); "
                             f"{rebuild_hint(path)}") from err
        if group is None or group.attrs.get("complete") is not True:
            raise FileNotFoundError(
                f"task vector of task {task!r} at {path} is missing or incomplete (a killed write or a partial "
                f"copy); {rebuild_hint(path)}")
        if group.attrs.get("task") != task:
            raise ValueError(f"{path} holds the task vector of task {group.attrs.get('task')!r}, not of task "
                             f"{task!r} (a copied or renamed subgroup); {rebuild_hint(path)}")
        if group.attrs.get("checksum") != CHECKSUM:
            raise ValueError(f"task vector of task {task!r} at {path} has no {CHECKSUM} chunk checksums (written by an "
                             f"older version of the pipeline); {rebuild_hint(path)}")
        return group

    def _arrays(self, task: str) -> dict[str, tuple[list[int], str]]:
        """Shape and dtype of each tensor of ``task``; refuses missing or unreadable array
        metadata and checksum lists that do not fit the chunks."""
        path = self.root / task
        arrays = {}
        for key in self.groups[task].attrs["keys"]:
            try:
                array = self._array(task, key)
            except (KeyError, ValueError) as err:
                raise ValueError(f"task vector of task {task!r}: the metadata of tensor {key!r}, "
                                 f"{path / key / 'zarr.json'}, is missing or unreadable ({err!r}); "
                                 f"{rebuild_hint(path)}") from None
            if len(array.attrs.get("checksums", ())) != array.nchunks:
                raise ValueError(f"task vector of task {task!r}: tensor {key!r} has "
                                 f"{len(array.attrs.get('checksums', ()))} chunk checksums for {array.nchunks} "
                                 f"chunks ({path / key / 'zarr.json'}); {rebuild_hint(path)}")
            arrays[key] = (array.attrs["shape"], array.attrs["dtype"])
        return arrays

    def numel(self) -> int:
        """Entries d of one full task vector."""
        return sum(int(np.prod(s)) for s in self.shapes.values())

    def chunks(self, device: torch.device | str | None = None, tasks: Sequence[str] | None = None,
               progress: str | None = None) -> Iterator[tuple[str, slice, torch.Tensor]]:
        """Yield ``(key, flat slice, (K, n) fp32 tensor)`` over every tensor chunk by chunk,
        K = len(tasks) (default all). Only one chunk per task is in memory at a time.
        Refuses NaN or Inf, and chunks that fail their checksum, naming task and tensor."""
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
        """The (K, n) fp32 values of ``key[span]`` of ``tasks`` (default all), each chunk read
        verified against its checksum; refuses NaN or Inf, naming task and tensor."""
        tasks = self.tasks if tasks is None else tasks
        block = torch.empty((len(tasks), span.stop - span.start), dtype=torch.float32)
        for row, task in zip(block, tasks):
            self._read_span(task, key, span, row)
        if not bool(torch.isfinite(block.sum())):  # NaN and Inf reach the sum (a cheap first test)
            bad = [t for t, row in zip(tasks, block) if not bool(torch.isfinite(row).all())]
            if bad:
                raise ValueError(f"task vector of task {bad[0]!r} has NaN or Inf in tensor {key!r} "
                                 f"({self.root / bad[0]}); rebuild it from a finite checkpoint")
        return block

    def verify_source(self, task: str, path: str | Path) -> None:
        """Refuse ``path`` unless it is the fine-tuned checkpoint (by SHA-256) that the task
        vector of ``task`` was computed from."""
        want, got = self.groups[task].attrs["source_sha256"], sha256_file(path)
        if got != want:
            raise ValueError(
                f"task vector of task {task!r} ({self.root / task}) was computed from a fine-tuned checkpoint "
                f"with sha256 {want[:12]}, but {path} has sha256 {got[:12]}: the checkpoint changed after the "
                f"task vector was written, or is another task's; {rebuild_hint(self.root / task)}")

    @functools.cache
    def _array(self, task: str, key: str) -> zarr.Array:
        return self.groups[task][key]

    @functools.cache
    def _layout(self, task: str, key: str) -> _Layout:
        """How the chunks of ``key`` of ``task`` are read and verified (read once per array)."""
        array = self._array(task, key)
        meta, attrs = array.metadata, self.groups[task].attrs
        plain = (len(meta.codecs) == 1 and type(meta.codecs[0]).__name__ == "BytesCodec"
                 and getattr(meta.codecs[0].endian, "value", None) == sys.byteorder)
        return _Layout(plain, array.chunks[0], meta.chunk_key_encoding.encode_chunk_key, list(array.attrs["checksums"]),
                       chunk_identity(task, attrs["base_hash"], attrs["source_sha256"], key))

    def _read_span(self, task: str, key: str, span: slice, out: torch.Tensor) -> None:
        """``key[span]`` of ``task`` into ``out`` from the whole chunks it overlaps (one, unless
        ``task`` was written with other chunks than the first task, or the span is a whole
        tensor); chunks inside the span are read straight into their part of ``out``."""
        step, size = self._layout(task, key).step, self._array(task, key).shape[0]
        for index in range(span.start // step, -(-span.stop // step)):
            lo, hi = index * step, min((index + 1) * step, size)
            if span.start <= lo and hi <= span.stop:
                self._read_chunk(task, key, index, out[lo - span.start:hi - span.start])
                continue
            chunk = torch.empty(hi - lo, dtype=torch.float32)
            self._read_chunk(task, key, index, chunk)
            start, stop = max(lo, span.start), min(hi, span.stop)
            out[start - span.start:stop - span.start] = chunk[start - lo:stop - lo]

    def _read_chunk(self, task: str, key: str, index: int, out: torch.Tensor) -> None:
        """Chunk ``index`` of ``key`` of ``task`` into ``out`` (fp32, the chunk's length),
        verified. Plain chunk files are read straight into ``out`` (16-bit types through a
        buffer, then converted): no zarr decode, the GIL released while reading and hashing, so
        reader threads overlap."""
        layout, storage = self._layout(task, key), self.storage[task]
        file = self.root / task / key / layout.chunk_key((index,))
        if not layout.plain:
            if not file.is_file():  # zarr would read the fill value
                raise self._chunk_error(task, key, index, "is missing (a deleted chunk file)")
            start = index * layout.step
            try:
                values = self._array(task, key)[start:start + len(out)]
            except Exception as err:  # noqa: BLE001 - whatever the codec makes of a damaged file
                raise self._chunk_error(task, key, index, f"cannot be decoded ({type(err).__name__}: {err})") from err
            self._verify(task, key, index, values)
            out.copy_(storage.decode(values))
            return
        raw = out if storage.dtype == "float32" else torch.empty(len(out), dtype=torch.int16)
        view = memoryview(raw.numpy()).cast("B")
        expected = layout.step * storage.itemsize  # an edge chunk's file is padded to the full chunk
        try:
            with open(file, "rb", buffering=0) as f:
                size, got = os.fstat(f.fileno()).st_size, 0
                while size == expected and got < len(view) and (n := f.readinto(view[got:])):
                    got += n
        except FileNotFoundError:
            raise self._chunk_error(task, key, index, "is missing (a deleted chunk file)") from None
        if got != len(view):
            raise self._chunk_error(task, key, index, f"has {size} bytes, expected {expected} (truncated, or "
                                                      f"written with another layout)")
        self._verify(task, key, index, raw.numpy())
        if raw is not out:
            out.copy_(raw.view(getattr(torch, storage.dtype)))

    def _verify(self, task: str, key: str, index: int, values: np.ndarray) -> None:
        layout = self._layout(task, key)
        if chunk_checksum(layout.identity, index, values) != layout.checksums[index]:
            raise self._chunk_error(task, key, index, "fails its checksum: its bytes are corrupted, or it was "
                                                      "copied from another task vector or tensor")

    def _chunk_error(self, task: str, key: str, index: int, problem: str) -> ValueError:
        file = self.root / task / key / self._layout(task, key).chunk_key((index,))
        return ValueError(f"chunk {index} of tensor {key!r} of task {task!r} ({file}) {problem}; "
                          f"{rebuild_hint(self.root / task)}")

    def nbytes(self) -> int:
        """Bytes of the stored arrays' chunk files on disk (what one full read reads)."""
        return sum(f.stat().st_size for t in self.tasks for f in (self.root / t).rglob("*") if f.is_file()
                   and f.name != "zarr.json")

    def describe(self) -> dict:
        """Provenance of the store's subgroups (for settings files)."""
        return {"store": str(self.root), "base_hash": self.base_hash,
                "sources": {t: self.groups[t].attrs["source_sha256"] for t in self.tasks}}
