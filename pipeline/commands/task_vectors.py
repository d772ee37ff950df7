"""The verb that writes one task vector into the zarr store."""

from __future__ import annotations

from pathlib import Path

from pipeline.store.task_vectors import DEFAULT_CHUNK_MIB, Storage, write_task_vector
from pipeline.zoo.store import load_clip, load_encoder_state


def task_vector(zoo: dict, task: str, pretrained: str, finetuned: str, out: str,
                chunk_mib: float = DEFAULT_CHUNK_MIB, storage: dict = {}) -> None:  # noqa: B006 (read-only)
    """Fine-tuned minus pretrained into ``out`` (a task subgroup of the store); ``storage``:
    element type, codec and level (pipeline.store.task_vectors.Storage)."""
    reference = load_clip(zoo, pretrained).visual.state_dict()
    write_task_vector(Path(out).parent, task, reference, load_encoder_state(finetuned), finetuned, chunk_mib,
                      Storage(**storage))
