"""The ``analysis-pem`` verb: composition of parameter-efficient modules (the paper's Table 6)."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from pipeline.analysis import pem
from pipeline.analysis.common import write_parquet
from pipeline.commands.loading import finetuned_models, task_splits
from pipeline.merging import registry
from pipeline.merging.lambda_search import grid as lambda_grid
from pipeline.models.checkpoints import load_safetensors
from pipeline.zoo.store import load_clip


def _inputs(zoo: dict, pretrained: str, tasks: list[str], heads: list[str], data: list[str]):
    encoder = load_clip(zoo, pretrained).visual
    state = {k: v.clone() for k, v in encoder.state_dict().items()}  # not views of the encoder's weights
    test = task_splits(zoo, tasks, heads, data, "test")
    val = [d for _, _, d in task_splits(zoo, tasks, heads, data, "val")]
    return encoder, state, test, val


def analysis_pem_lora(zoo: dict, pretrained: str, tasks: list[str], lora: list[str], heads: list[str], grid: dict,
                      out: str, data: list[str] = (), negation_lam: float = -1.0, adamerging: dict = {},  # noqa: B006
                      max_images: int = 0, batch_size: int = 512) -> None:
    """The LoRA rows of the PEM analysis: individual, addition, negation and AdaMerging of the
    LoRA factors (``lora``, in ``tasks`` order), a job of its own so that it need not wait for
    the main table the full fine-tuning rows come from."""
    encoder, state, test, val = _inputs(zoo, pretrained, tasks, heads, data)
    settings = registry.method("adamerging_task_wise").configure(adamerging)
    table = pem.rows("lora", encoder, state, tasks, [load_safetensors(f) for f in lora], test, val,
                     lambda_grid(**grid), negation_lam, settings, max_images, batch_size)
    write_parquet(table, out)


def analysis_pem(zoo: dict, pretrained: str, tasks: list[str], lora_rows: str,
                 heads: list[str], grid: dict, out: str, figure: str, data: list[str] = (),
                 negation_lam: float = -1.0, adamerging: dict = {}, max_images: int = 0,  # noqa: B006
                 batch_size: int = 512, finetuned: list[str] = (), main_individual: list[str] = (),
                 main_addition: str | None = None, main_addition_model: str | None = None,
                 main_negation: list[str] = (), main_adamerging: str | None = None) -> None:
    """The PEM table and figure (the paper's Table 6): full fine-tuning against the LoRA rows of
    ``analysis-pem-lora`` (``lora_rows``). With the ``main_*`` files (the main table's
    evaluations: individual per task, Task Arithmetic and its merge's model.json, the negation
    of each task, task-wise AdaMerging, all in ``tasks`` order) the full fine-tuning rows are
    those, else they are composed here from the ``finetuned`` models."""
    if main_addition:
        full_rows = pem.main_table_rows(
            tasks, pd.concat([pd.read_parquet(f) for f in main_individual]), pd.read_parquet(main_addition),
            json.loads(Path(main_addition_model).read_text())["settings"]["lam"],
            {t: pd.read_parquet(f) for t, f in zip(tasks, main_negation, strict=True)}, negation_lam,
            pd.read_parquet(main_adamerging))
    else:
        encoder, state, test, val = _inputs(zoo, pretrained, tasks, heads, data)
        settings = registry.method("adamerging_task_wise").configure(adamerging)
        full_rows = pem.rows("full", encoder, state, tasks, list(finetuned_models(finetuned)), test, val,
                             lambda_grid(**grid), negation_lam, settings, max_images, batch_size)
    table = pd.concat([full_rows, pd.read_parquet(lora_rows)], ignore_index=True)[pem.COLUMNS]
    write_parquet(table, out)
    pem.plot(table, figure)
