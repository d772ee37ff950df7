"""The ``analysis-pem`` verb: composition of parameter-efficient modules (the paper's Table 6)."""

from __future__ import annotations

from pipeline.analysis import pem
from pipeline.analysis.common import write_parquet
from pipeline.merging.lambda_search import grid as lambda_grid


def analysis_pem(zoo: dict, pretrained: str, tasks: list[str], finetuned: list[str], lora: list[str],
                 heads: list[str], grid: dict, out: str, figure: str, data: list[str] = (),
                 negation_lam: float = -1.0, adamerging: dict = {}, max_images: int = 0,  # noqa: B006
                 batch_size: int = 512) -> None:
    """Addition, negation and AdaMerging of LoRA factors (``lora``) against full fine-tuning."""
    table = pem.run(zoo, pretrained, tasks, finetuned, lora, heads, data, lambda_grid(**grid), negation_lam,
                    adamerging, max_images, batch_size)
    write_parquet(table, out)
    pem.plot(table, figure)
