"""The ``adamerge`` verb: learn AdaMerging coefficients on unlabeled test images and write
the merged encoder, the coefficients and the entropy curve."""

from __future__ import annotations

import logging

from pipeline.commands.loading import finetuned_models, heads_of, unlabeled_test_images
from pipeline.io import write_parquet
from pipeline.merging import registry
from pipeline.merging.adamerging import entropy_table, lambda_table
from pipeline.merging.contract import Inputs, default_device
from pipeline.models.checkpoints import save_state_dict
from pipeline.zoo.store import load_clip

log = logging.getLogger(__name__)


def adamerge(zoo: dict, variant: str, pretrained: str, finetuned: list[str], heads: list[str], tasks: list[str],
             out: str, lambdas: str, entropy: str, data: list[str] = (), settings: dict = {},  # noqa: B006
             max_images: int = 0, device: str = "auto") -> None:
    """Learn the coefficients of one AdaMerging variant (task_wise, layer_wise, ..._plus) on at
    most ``max_images`` test images per task (0: all) and write the merge (``out``), the
    coefficients (``lambdas``) and the entropy curve (``entropy``)."""
    n = len(tasks)
    if not len(finetuned) == len(heads) == n or data and len(data) != n:
        raise ValueError(f"{n} tasks need as many --finetuned, --heads (and --data) files")
    spec = registry.method(f"adamerging_{variant}")
    config = spec.configure(settings)
    images = unlabeled_test_images(zoo, tasks, data, max_images, config.seed, log)
    encoder = load_clip(zoo, pretrained).visual
    inputs = Inputs(encoder.state_dict(), tasks, encoder=encoder, finetuned=list(finetuned_models(finetuned)),
                    heads=heads_of(heads), test=images, device=default_device() if device == "auto" else device,
                    arch=zoo["arch"])
    result = spec.run(inputs, config).details["result"]
    log.info("%s: entropy %.4f -> %.4f, final coefficients in [%.3f, %.3f]", variant,
             result.entropy[0] if result.entropy else float("nan"),
             result.entropy[-1] if result.entropy else float("nan"),
             float(result.lambdas.min()), float(result.lambdas.max()))
    save_state_dict(result.state_dict, out)
    write_parquet(lambda_table(result, tasks), lambdas)
    write_parquet(entropy_table(result), entropy)
