"""The ``adapt`` verb: a method learned on unlabeled test images beside AdaMerging
(Representation Surgery over a saved base merge, WEMoE) into its merge, its loss curve, a
summary (what it adds) and, for WEMoE, its routing weights and their figure."""

from __future__ import annotations

import logging

import pandas as pd

from pipeline.commands.loading import finetuned_models, heads_of, unlabeled_test_images
from pipeline.io import write_json, write_parquet
from pipeline.merging import registry
from pipeline.merging.contract import Inputs, default_device
from pipeline.zoo.store import load_clip

log = logging.getLogger(__name__)


def adapt(zoo: dict, method: str, pretrained: str, finetuned: list[str], heads: list[str], tasks: list[str],
          out: str, summary: str, curve: str, data: list[str] = (), base: str | None = None,
          routing: str | None = None, routing_figure: str | None = None,
          settings: dict = {}, max_images: int = 0, device: str = "auto") -> None:  # noqa: B006 (read-only)
    """Run ``method`` (surgery: over the ``base`` merge file; wemoe) on at most ``max_images``
    test images per task (0: all) and write the merge (``out``: Surgery's manifest beside its
    modules, WEMoE's model), ``summary`` (JSON), ``curve`` (loss per step) and, for WEMoE,
    ``routing`` (parquet) and ``routing_figure`` (PNG)."""
    spec = registry.method(method)
    if method not in registry.test_time_methods():
        raise ValueError(f"adapt runs {registry.test_time_methods()}, not {method!r} (AdaMerging: the adamerge "
                         "verb; the other methods: merge)")
    n = len(tasks)
    if not len(finetuned) == len(heads) == n or data and len(data) != n:
        raise ValueError(f"{n} tasks need as many --finetuned, --heads (and --data) files")
    if method == "surgery" and not base:
        raise ValueError("surgery needs --base: the merged model file of its base method (settings.base)")
    config = spec.configure(settings)
    encoder = load_clip(zoo, pretrained).visual
    inputs = Inputs({k: v.clone() for k, v in encoder.state_dict().items()}, list(tasks), encoder=encoder,
                    finetuned=finetuned_models(finetuned), heads=heads_of(heads),
                    test=unlabeled_test_images(zoo, tasks, data, max_images, config.seed, log), base=base,
                    device=default_device() if device == "auto" else device)
    result = spec.run(inputs, config)
    result.save(out)
    record = {"method": method, "settings": settings, "tasks": list(tasks)}
    if method == "surgery":
        record |= {"base_method": config.base, "base": base, "added_parameters": result.added_parameters()}
        table = result.loss_table()
        first = table[table["step"] == table["step"].min()]["l1"].mean() if len(table) else float("nan")
        last = table[table["step"] == table["step"].max()]["l1"].mean() if len(table) else float("nan")
        log.info("surgery over %s: L1 %.4f -> %.4f, %d parameters added", config.base, first, last,
                 record["added_parameters"])
    else:
        from pipeline.analysis.routing import plot_routing
        from pipeline.merging.wemoe import added_parameters

        counts = added_parameters(result.model)
        record |= {**counts, "added_parameters": sum(counts.values()), "blocks": sorted(result.model.mlps)}
        table = pd.DataFrame({"step": range(len(result.entropy)), "entropy": result.entropy})
        if routing:
            write_parquet(result.routing, routing)
        if routing_figure:
            plot_routing(result.routing, routing_figure)
        log.info("wemoe: entropy %.4f -> %.4f; %d router and %d expert parameters added",
                 result.entropy[0] if result.entropy else float("nan"),
                 result.entropy[-1] if result.entropy else float("nan"), counts["router_parameters"],
                 counts["expert_parameters"])
    write_parquet(table, curve)
    write_json(record, summary)
