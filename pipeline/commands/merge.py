"""The ``merge`` verb: any registered method (but the test-time ones) into one merged encoder."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from pipeline.commands.loading import finetuned_models, heads_of, open_store, splits
from pipeline.io import write_json
from pipeline.merging import registry
from pipeline.merging.contract import Inputs, Merge, Need, default_device
from pipeline.zoo.store import load_clip

log = logging.getLogger(__name__)


def write_merge(merge: Merge, out: str, record: dict) -> dict:
    """The merged encoder to ``out`` (safetensors) and ``record`` beside it (.json), with the
    bytes on disk of a compact merge (task-routed methods: its ``storage`` summary)."""
    summary = merge.save(out)
    write_json(record | {k: summary[k] for k in ("storage",) if k in summary}, Path(out).with_suffix(".json"))
    return summary


def merge(zoo: dict, method: str, pretrained: str, out: str, tasks: list[str] = (),
          task_vectors: list[str] = (), finetuned: list[str] = (), heads: list[str] = (), data: list[str] = (),
          settings: dict = {}, budget_mib: float = 1024) -> None:  # noqa: B006 (read-only defaults)
    """Merge with a registered method; pass what its needs name (task vectors; fine-tuned
    encoders, heads and training data)."""
    spec = registry.method(method)
    if Need.TEST_DATA in spec.needs:
        raise ValueError(f"merge: {method} learns on unlabeled test images; run it with the adamerge verb")
    config = spec.configure(settings)
    inputs = Inputs({}, list(tasks), seed=zoo["seed"], device=default_device(), budget_mib=budget_mib,
                    arch=zoo["arch"])
    record = {"method": method, "settings": dataclasses.asdict(config), "tasks": list(tasks)}  # defaults filled in
    if Need.TASK_VECTORS in spec.needs:
        _, inputs.pretrained, inputs.store = open_store(zoo, pretrained, task_vectors)
        inputs.tasks = inputs.store.tasks
        record |= {"tasks": inputs.tasks, **inputs.store.describe()}
    else:
        inputs.encoder = load_clip(zoo, pretrained).visual
        inputs.pretrained = {k: v.clone() for k, v in inputs.encoder.state_dict().items()}
    if Need.TRAIN_DATA in spec.needs:
        inputs.heads, inputs.train = heads_of(heads), splits(zoo, tasks, data, "train")
    if Need.MODELS in spec.needs:
        inputs.finetuned = finetuned_models(finetuned)
    summary = write_merge(spec.run(inputs, config), out, record)
    if summary:
        log.info("%s: %d passes, %.0f MiB read, %.1f s", method, summary["passes"], summary["bytes_read"] / 2**20,
                 summary["seconds"])
    if "storage" in summary:
        log.info("%s: %.1f MiB on disk, %.1f%% of %d full models", method, summary["storage"]["bytes"] / 2**20,
                 100 * summary["storage"]["fraction_of_full_models"], len(inputs.tasks))
