"""Checkpoint files: atomic safetensors writes (whole state dicts, or streamed tensor by
tensor with :class:`SafetensorsWriter`), content hashes, and loading fine-tuned image
encoders from the formats the community publishes into open_clip image-encoder state dicts
(the keys of ``open_clip.create_model(arch).visual.state_dict()``).

Accepted by :func:`load_state_dict`, files recognised by their content, whatever their suffix:

- safetensors files and ``torch.save`` files (zip or legacy pickle) readable with
  ``torch.load(weights_only=True)``, holding an open_clip image-encoder state dict, possibly
  behind a prefix (``visual.``, ``model.visual.``, ``image_encoder.model.visual.``, ...;
  other keys are dropped) or inside ``{"state_dict": ...}``;
- Hugging Face CLIP vision checkpoints: a ``save_pretrained`` directory or a state dict of
  a ``CLIPModel``, ``CLIPVisionModelWithProjection`` or ``CLIPVisionModel``, in the key
  layout of transformers 4 or 5 (mapped by :mod:`pipeline.models.hf_clip`). A
  ``CLIPVisionModel`` (FusionBench's encoders) has no projection: the pretrained image
  encoder's ``proj`` is taken in its place;
- the task_vectors / AdaMerging release (whole pickled ``ImageEncoder`` objects), only with
  ``trust_pickles=True``: unpickling runs code from the file.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import math
import pickle
import struct
import types
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from pipeline.io import atomic_path
from pipeline.models.hf_clip import HF_PATCH_KEY, HF_VISION_PREFIX, hf_vision_to_open_clip

StateDict = dict[str, torch.Tensor]

_HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
# what to do about a model a job computed with NaN or Inf in it
NONFINITE_OUTPUT = ("the computation diverged or overflowed (too large an lr or lambda?) or one of its inputs "
                    "holds NaN or Inf: check the inputs and the settings that produced it")


def save_state_dict(state_dict: Mapping[str, torch.Tensor], path: str | Path) -> None:
    """Write ``state_dict`` as safetensors (contiguous CPU tensors) through a temporary file in
    the same folder and a rename, so a killed job never leaves a half-written ``path``; a
    floating-point tensor with NaN or Inf is refused, naming it (no job publishes one)."""
    tensors, storages = {}, set()
    for key, value in state_dict.items():
        tensor = value.detach().cpu().contiguous()
        ptr = tensor.untyped_storage().data_ptr()
        if ptr in storages:  # safetensors refuses tensors that share memory
            tensor = tensor.clone()
        storages.add(tensor.untyped_storage().data_ptr())
        tensors[key] = tensor
    check_finite(tensors, f"refusing to write {path}", NONFINITE_OUTPUT)
    with atomic_path(path) as tmp:
        save_file(tensors, tmp)


def load_safetensors(path: str | Path) -> StateDict:
    """The tensors of a safetensors file; an unreadable one (truncated, empty, not
    safetensors) is refused naming it and the fix."""
    with readable(path):
        return load_file(str(path))


def damaged(path: str | Path, reason: str) -> ValueError:
    """The error for a checkpoint file that cannot be read, naming it, why, and the fix."""
    return ValueError(f"cannot read {path} ({reason}): the file is truncated or damaged, e.g. by a killed "
                      "download or write. Delete it and rebuild it (rerun the job that writes it) or download "
                      "it again")


@contextlib.contextmanager
def readable(path: str | Path):
    """Re-raise the errors of reading a damaged checkpoint file (safetensors' header errors,
    torch's EOF, zip and unpickling errors) as :func:`damaged`'s."""
    try:
        yield
    except (FileNotFoundError, PermissionError, IsADirectoryError):
        raise
    except (SafetensorError, EOFError, RuntimeError, OSError, pickle.UnpicklingError) as err:
        raise damaged(path, f"{type(err).__name__}: {str(err)[:200] or 'end of file'}") from err


class SafetensorsWriter:
    """Write a safetensors file tensor by tensor, in the order of ``specs`` (name, dtype,
    shape), chunks of a tensor in order; a temporary file (:func:`pipeline.io.atomic_path`)
    renamed on ``close``, removed on ``abort``."""

    _DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
               torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
               torch.uint8: "U8", torch.bool: "BOOL"}

    def __init__(self, path: str | Path, specs: Sequence[tuple[str, torch.dtype, Sequence[int]]],
                 metadata: Mapping[str, str] | None = None):
        self.path = Path(path)
        header, offset = {}, 0
        if metadata:
            header["__metadata__"] = dict(metadata)
        self.offsets: dict[str, tuple[int, int, torch.dtype]] = {}
        for name, dtype, shape in specs:
            size = math.prod(shape) * dtype.itemsize
            header[name] = {"dtype": self._DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
            self.offsets[name] = (offset, offset + size, dtype)
            offset += size
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self.data_start = 8 + len(raw)
        self._target = atomic_path(self.path)
        self.tmp = self._target.tmp
        try:
            self.file = open(self.tmp, "wb")
            self.file.write(struct.pack("<Q", len(raw)) + raw)
        except BaseException:
            self.abort()
            raise

    def write(self, name: str, values: torch.Tensor) -> None:
        """Append the next ``values`` (flat, the tensor's dtype) of tensor ``name``; NaN or
        Inf is refused, naming the tensor and the entries."""
        start, end, dtype = self.offsets[name]
        pos = self.file.tell() - self.data_start
        if not start <= pos < end or values.dtype != dtype:
            raise ValueError(f"{name}: writes must follow the header order and dtype {dtype}")
        values = values.detach().cpu().contiguous()
        first = (pos - start) // dtype.itemsize  # the entries these values start at
        check_finite({f"{name}[{first}:{first + values.numel()}]": values}, f"refusing to write {self.path}",
                     NONFINITE_OUTPUT)
        self.file.write(values.view(torch.uint8).numpy().tobytes())

    def close(self, patches: Sequence[tuple[str, torch.Tensor, torch.Tensor]] = ()) -> Path:
        """Overwrite single entries (flat index, value) of written tensors, then publish; on
        any failure (a non-finite patch, a full disk) the temporary file is removed."""
        try:
            for name, index, values in patches:
                start, _, dtype = self.offsets[name]
                values = values.to(dtype)
                check_finite({f"{name} (patched entries)": values}, f"refusing to write {self.path}",
                             NONFINITE_OUTPUT)
                data = values.view(torch.uint8).reshape(len(index), -1).numpy()
                for i, row in zip(index.tolist(), data):
                    self.file.seek(self.data_start + start + i * dtype.itemsize)
                    self.file.write(row.tobytes())
            self.file.close()
            return self._target.commit()
        except BaseException:
            self.abort()
            raise

    def abort(self) -> None:
        """Drop the temporary file; never raises (closing it may fail, e.g. on a full disk)."""
        try:
            with contextlib.suppress(Exception):  # the file is thrown away: the caller's error matters
                if getattr(self, "file", None) is not None:
                    self.file.close()
        finally:
            self._target.discard()


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def state_dict_hash(state_dict: Mapping[str, torch.Tensor]) -> str:
    """Hex SHA-256 over the sorted keys and each tensor's dtype, shape and bytes: equal for
    equal contents whatever the file format or key order."""
    digest = hashlib.sha256()
    for key in sorted(state_dict):
        tensor = state_dict[key].detach().cpu().contiguous()
        digest.update(f"{key}\0{tensor.dtype}\0{tuple(tensor.shape)}\0".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def check_finite(state_dict: Mapping[str, torch.Tensor], name: str,
                 fix: str = "the checkpoint is corrupt or diverged: rebuild it or download it again") -> None:
    """Refuse a state dict with NaN or Inf in a floating-point tensor, naming key and source
    (``name``), how many entries, and ``fix``."""
    for key, tensor in state_dict.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = tensor.numel() - int(torch.isfinite(tensor).sum())
            raise ValueError(
                f"{name}: tensor {key!r} contains NaN or Inf ({bad} of {tensor.numel()} entries); {fix}"
            )


def check_compatible(
    reference_sd: Mapping[str, torch.Tensor],
    sd: Mapping[str, torch.Tensor],
    ref_name: str,
    name: str,
) -> None:
    """Refuse ``sd`` unless it has exactly the keys, shapes and dtypes of ``reference_sd``."""
    missing = sorted(set(reference_sd) - set(sd))
    extra = sorted(set(sd) - set(reference_sd))
    if missing or extra:
        raise ValueError(
            f"{name} does not match {ref_name}: keys missing from {name}: {missing[:5]}"
            f"{' ...' if len(missing) > 5 else ''}; keys only in {name}: {extra[:5]}"
            f"{' ...' if len(extra) > 5 else ''}. Both must be image encoders of the same "
            "architecture"
        )
    for key, ref in reference_sd.items():
        other = sd[key]
        if ref.shape != other.shape or ref.dtype != other.dtype:
            raise ValueError(
                f"{name} does not match {ref_name} at {key!r}: {name} has "
                f"{other.dtype} {tuple(other.shape)}, {ref_name} has {ref.dtype} "
                f"{tuple(ref.shape)}. Both must be image encoders of the same architecture "
                "and precision"
            )


def load_state_dict(
    path: str | Path,
    *,
    trust_pickles: bool = False,
    prefix_hint: str | None = None,
    pretrained_visual: Mapping[str, torch.Tensor] | None = None,
) -> StateDict:
    """The open_clip image-encoder state dict stored at ``path`` (see the module docstring
    for the formats). ``prefix_hint`` is the key prefix in front of the encoder's keys
    (e.g. ``"image_encoder.model.visual."``) for files where it cannot be detected.
    ``pretrained_visual`` is the pretrained open_clip image encoder's state dict, whose
    ``proj`` stands in for the projection a Hugging Face ``CLIPVisionModel`` lacks."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    hf_config = None
    if path.is_dir():
        raw, hf_config = read_hf_dir(path, trust_pickles)
    else:
        raw = read_state_dict_file(path, trust_pickles)
    if prefix_hint:
        raw = {k[len(prefix_hint) :]: v for k, v in raw.items() if k.startswith(prefix_hint)}
        if not raw:
            raise ValueError(f"no key of {path} starts with prefix_hint {prefix_hint!r}")
    projection = None if pretrained_visual is None else pretrained_visual.get("proj")
    sd = _image_encoder_keys(raw, hf_config, path, projection)
    sd = {k: v.detach().cpu() for k, v in sd.items()}
    check_finite(sd, str(path))
    return sd


def read_state_dict_file(path: str | Path, trust_pickles: bool = False) -> StateDict:
    """The tensors of a safetensors or ``torch.save`` file, told apart by their first bytes
    (not the suffix); a pickled module gives its state dict, ``{"state_dict": ...}`` the
    inner one."""
    path = Path(path)
    if _file_format(path) == "safetensors":
        return load_safetensors(path)
    return _state_dict_of(_torch_load(path, trust_pickles), path)


def _file_format(path: Path) -> str:
    """``"safetensors"`` (an 8-byte little-endian header length, then the JSON header) or
    ``"torch"`` (a zip archive, or a pickle for the legacy format)."""
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) == 9 and head[8:] == b"{":
        if 8 + struct.unpack("<Q", head[:8])[0] > path.stat().st_size:
            raise damaged(path, "a safetensors header that runs past the end of the file")
        return "safetensors"
    if head.startswith(b"PK\x03\x04") or head.startswith(b"\x80"):
        return "torch"
    if not head:
        raise damaged(path, "an empty file")
    raise ValueError(
        f"{path} is neither a safetensors file nor a torch.save file (zip archive or pickle); "
        f"its first bytes are {head!r}. Give a checkpoint written by safetensors or "
        "torch.save, or a Hugging Face save_pretrained directory"
    )


def _torch_load(path: Path, trust_pickles: bool) -> object:
    """``torch.load`` of ``path`` given as an open file: given a name, torch reads a
    ``.safetensors`` suffix as safetensors, whatever the content."""
    with readable(path):
        try:
            with open(path, "rb") as f:
                return torch.load(f, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err:
            if not trust_pickles:
                raise ValueError(
                    f"{path} holds pickled Python objects (like the task_vectors/AdaMerging "
                    "release's ImageEncoder files); loading it runs code from the file. If you "
                    "trust its source, set `trust_pickles: true` in the zoo config "
                    "(load_state_dict(..., trust_pickles=True))"
                ) from err
        with open(path, "rb") as f:
            return torch.load(f, map_location="cpu", weights_only=False, pickle_module=_lenient_pickle)


class _LenientUnpickler(pickle.Unpickler):
    """Unpickler that stands in a plain ``nn.Module`` subclass for classes whose module cannot
    be imported (the release pickles name ``src.modeling.ImageEncoder`` of the task_vectors
    repository); their tensors and submodules load unchanged."""

    def find_class(self, module: str, name: str) -> object:
        try:
            return super().find_class(module, name)
        except (ImportError, AttributeError):
            return _stand_in(module, name)


@functools.cache
def _stand_in(module: str, name: str) -> type[nn.Module]:
    warnings.warn(
        f"pickled class {module}.{name} is not importable; loading it as a plain "
        "torch.nn.Module (only its weights are used)",
        stacklevel=2,
    )
    return type(name, (nn.Module,), {"__module__": module})


_lenient_pickle = types.ModuleType("_lenient_pickle")
_lenient_pickle.Unpickler = _LenientUnpickler
_lenient_pickle.load = lambda f, **kwargs: _LenientUnpickler(f, **kwargs).load()


def _state_dict_of(obj: object, path: Path) -> StateDict:
    if isinstance(obj, nn.Module):
        return obj.state_dict()
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if isinstance(obj, Mapping) and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return dict(obj)
    raise ValueError(
        f"{path} holds a {type(obj).__name__}, not a state dict (a mapping of names to "
        "tensors) nor a pickled module"
    )


def read_hf_dir(path: str | Path, trust_pickles: bool = False) -> tuple[StateDict, dict | None]:
    """Weights and config.json (None when absent) of a Hugging Face ``save_pretrained``
    directory (single file or sharded with an index)."""
    path = Path(path)
    config_path = path / "config.json"
    config = json.loads(config_path.read_text()) if config_path.exists() else None
    for name in _HF_WEIGHT_FILES:
        index = path / f"{name}.index.json"
        files = (
            sorted(set(json.loads(index.read_text())["weight_map"].values()))
            if index.exists()
            else [name]
        )
        if all((path / f).exists() for f in files):
            sd: StateDict = {}
            for f in files:
                sd.update(read_state_dict_file(path / f, trust_pickles))
            return sd, config
    raise FileNotFoundError(
        f"{path} is a directory but holds no Hugging Face weights: expected one of "
        f"{', '.join(_HF_WEIGHT_FILES)} (or their .index.json shards) next to config.json"
    )


def _image_encoder_keys(
    raw: Mapping[str, torch.Tensor], hf_config: dict | None, path: Path, projection: torch.Tensor | None
) -> StateDict:
    """Strip the prefix in front of the open_clip image-encoder keys (dropping all others), or
    map Hugging Face CLIP vision keys to open_clip's (``projection`` standing in for a missing
    one)."""
    prefixes = {
        k[: -len("conv1.weight")]
        for k in raw
        if k.endswith("conv1.weight") and k[: -len("conv1.weight")] + "class_embedding" in raw
    }
    hf_prefixes = {k[: -len(HF_PATCH_KEY)] for k in raw if k.endswith(HF_PATCH_KEY)}
    if len(prefixes) > 1 or len(hf_prefixes) > 1:
        raise ValueError(
            f"{path} holds several image encoders (key prefixes "
            f"{sorted(prefixes | hf_prefixes)}); pass prefix_hint to choose one"
        )
    if prefixes:
        (prefix,) = prefixes
        return {k[len(prefix) :]: v for k, v in raw.items() if k.startswith(prefix)}
    if hf_prefixes:
        # "<outer>vision_model." (projection beside it, under <outer>) or a bare tower
        (prefix,) = hf_prefixes
        outer = prefix.removesuffix(HF_VISION_PREFIX)
        try:
            return hf_vision_to_open_clip(
                {k[len(outer) :]: v for k, v in raw.items() if k.startswith(outer)},
                hf_config,
                projection=projection,
            )
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from None
    raise ValueError(
        f"{path} holds no open_clip ViT image encoder (no '<prefix>conv1.weight' next to "
        f"'<prefix>class_embedding') and no Hugging Face CLIP vision model ('{HF_PATCH_KEY}'); "
        f"first keys: {list(raw)[:5]}"
    )
