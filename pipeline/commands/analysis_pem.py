"""The ``analysis-pem`` verb: composition of parameter-efficient modules (the paper's Table 6)."""

from __future__ import annotations

from pipeline.analysis import pem
from pipeline.analysis.common import write_parquet
from pipeline.commands.loading import finetuned_models, task_splits
from pipeline.merging import registry
from pipeline.merging.lambda_search import grid as lambda_grid
from pipeline.models.checkpoints import load_safetensors
from pipeline.zoo.store import load_clip


def analysis_pem(zoo: dict, pretrained: str, tasks: list[str], finetuned: list[str], lora: list[str],
                 heads: list[str], grid: dict, out: str, figure: str, data: list[str] = (),
                 negation_lam: float = -1.0, adamerging: dict = {}, max_images: int = 0,  # noqa: B006
                 batch_size: int = 512) -> None:
    """Addition, negation and AdaMerging of LoRA factors (``lora``) against full fine-tuning."""
    encoder = load_clip(zoo, pretrained).visual
    state = {k: v.clone() for k, v in encoder.state_dict().items()}  # not views of the encoder's weights
    test = task_splits(zoo, tasks, heads, data, "test")
    val = [d for _, _, d in task_splits(zoo, tasks, heads, data, "val")]
    settings = registry.method("adamerging_task_wise").configure(adamerging)
    table = pem.run(encoder, state, tasks, list(finetuned_models(finetuned)), [load_safetensors(f) for f in lora],
                    test, val, lambda_grid(**grid), negation_lam, settings, max_images, batch_size)
    write_parquet(table, out)
    pem.plot(table, figure)
