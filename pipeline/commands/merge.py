"""The merge verbs: any registered method into one merged encoder (``merge``), and the
methods whose lambda is chosen on the validation split (``lambda-search``)."""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd

from pipeline.commands.loading import finetuned_models, heads_of, open_store, splits
from pipeline.io import write_json, write_parquet
from pipeline.merging import registry
from pipeline.merging.contract import Inputs, Merge, Need, apply_vector, default_device
from pipeline.merging.lambda_search import grid as lambda_grid
from pipeline.merging.lambda_search import search
from pipeline.models.checkpoints import save_state_dict
from pipeline.zoo.store import load_clip

log = logging.getLogger(__name__)


def write_merge(merge: Merge, out: str, record: dict) -> dict:
    """The merged encoder to ``out`` (safetensors) and ``record`` beside it (.json)."""
    summary = merge.save(out)
    write_json(record, Path(out).with_suffix(".json"))
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
    inputs = Inputs({}, list(tasks), seed=zoo["seed"], device=default_device(), budget_mib=budget_mib)
    record = {"method": method, "settings": settings, "tasks": list(tasks)}
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


def lambda_search(zoo: dict, method: str, pretrained: str, task_vectors: list[str], heads: list[str],
                  grid: dict, search_out: str, out: str, data: list[str] = (), settings: dict = {},  # noqa: B006
                  batch_size: int = 512, budget_mib: float = 1024) -> None:
    """Merge with a searched method at every lambda of ``grid`` (start, stop, step), keep each
    one's validation accuracy and write the best one's encoder."""
    spec = registry.method(method)
    if not spec.searched:
        raise ValueError(f"lambda-search: {method} has no searched lambda; searched: "
                         f"{registry.names(searched=True)}")
    encoder, state, store = open_store(zoo, pretrained, task_vectors)
    config, lambdas = spec.configure(settings), lambda_grid(**grid)
    vector = spec.run(Inputs(state, store.tasks, store, device=default_device(), budget_mib=budget_mib),
                      config).vector()
    val = list(zip(store.tasks, heads_of(heads), splits(zoo, store.tasks, data, "val"), strict=True))
    rows, best = search(encoder, state, vector, lambdas, val, method, batch_size)
    log.info("%s: best lambda %s on validation", method, best)
    write_parquet(pd.DataFrame(rows), search_out)
    save_state_dict(apply_vector(state, vector, best), out)
    write_json({"method": method, "settings": {**settings, "lam": best}, "lambda_grid": lambdas,
                "tasks": store.tasks, **store.describe()}, Path(out).with_suffix(".json"))
