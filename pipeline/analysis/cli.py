"""The ``analysis-*`` verbs of ``python -m pipeline`` (one per analysis rule)."""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path

import pandas as pd

log = logging.getLogger(__name__)


def _sensitivity(a) -> None:
    from pipeline.analysis.common import write_parquet
    from pipeline.analysis.sensitivity import plot_sensitivity, run

    table = run(a.zoo, a.pretrained, a.task_vectors, a.search, a.references, a.heads, a.data, a.settings,
                a.test, a.batch_size)
    write_parquet(table, a.out)
    plot_sensitivity(table, a.figure)


def _coefficients(a) -> None:
    from pipeline.analysis.coefficients import coefficient_table, plot_entropy, plot_layer_wise, plot_task_wise
    from pipeline.analysis.common import write_parquet

    table = coefficient_table(pd.concat([pd.read_parquet(f) for f in a.lambdas], ignore_index=True))
    write_parquet(table, a.out)
    plot_layer_wise(table, a.layer_figure)
    plot_task_wise(table, a.task_figure)
    plot_entropy(pd.concat([pd.read_parquet(f) for f in a.entropy], ignore_index=True), a.entropy_figure)


def _distances(a) -> None:
    from pipeline.analysis.common import write_parquet
    from pipeline.analysis.distances import cosine_matrix, l2_distances, plot_matrix
    from pipeline.models.checkpoints import state_dict_hash
    from pipeline.store.task_vectors import TaskVectorStore
    from pipeline.zoo.store import load_clip

    models = {"pretrained": a.pretrained} | dict(m.split("=", 1) for m in a.models)
    dist = l2_distances(models, {"pretrained": "visual."})
    write_parquet(dist, a.out)
    plot_matrix(dist, "l2", a.figure, "L2 distance between image encoders")
    base = state_dict_hash(load_clip(a.zoo, a.pretrained).visual.state_dict())
    store = TaskVectorStore(Path(a.task_vectors[0]).parent, [Path(p).name for p in a.task_vectors], base_hash=base)
    cos = cosine_matrix(store)
    write_parquet(cos, a.cosine_out)
    off = cos.loc[cos["a"] != cos["b"], "cosine"].abs()
    vmax = float(off.max()) if len(off) else 1.0
    plot_matrix(cos, "cosine", a.cosine_figure, "Cosine similarity of task vectors", cmap="RdBu_r", fmt="{:.2f}",
                vmin=-vmax, vmax=vmax)


def _surrogate(a) -> None:
    import importlib

    from pipeline.analysis.common import load_encoder, task_splits, write_parquet
    from pipeline.analysis.surrogate import plot_scatter, sample_table, spearman_table
    from pipeline.models.checkpoints import state_dict_hash
    from pipeline.store.task_vectors import TaskVectorStore

    tasks = [Path(p).name for p in a.task_vectors]
    encoder, sd = load_encoder(a.zoo, a.pretrained)
    store = TaskVectorStore(Path(a.task_vectors[0]).parent, tasks, base_hash=state_dict_hash(sd))
    vector = importlib.import_module("pipeline.merging.task_arithmetic").vector(store)
    samples = sample_table(encoder, sd, vector, a.lambdas, task_splits(a.zoo, tasks, a.heads, a.data),
                           a.batch_size, a.max_samples)
    spearman = spearman_table(samples)
    write_parquet(samples, a.out)
    write_parquet(spearman, a.spearman_out)
    plot_scatter(samples, spearman, a.figure)
    log.info("Spearman entropy vs loss:\n%s", spearman.to_string())


def _robustness(a) -> None:
    from pipeline.analysis.common import write_parquet
    from pipeline.analysis.robustness import run

    table = run(a.zoo, a.pretrained, a.task_vectors, a.finetuned, a.heads, a.data, a.corruption, a.severity,
                a.variant, a.adamerging, a.lambdas, a.ties, a.max_images, a.batch_size)
    write_parquet(table, a.out)


def _robustness_table(a) -> None:
    from pipeline.analysis.common import write_parquet
    from pipeline.analysis.robustness import plot_robustness

    table = pd.concat([pd.read_parquet(f) for f in a.inputs], ignore_index=True)
    write_parquet(table, a.out)
    plot_robustness(table, a.figure)


def _unseen(a) -> None:
    from pipeline.analysis import unseen
    from pipeline.analysis.common import write_parquet

    if a.variant == "baselines":
        table = unseen.run_baselines(a.zoo, a.pretrained, a.task_vectors, a.tasks, a.unseen, a.heads, a.data,
                                     a.lambdas, a.ties, a.batch_size)
    else:
        table = unseen.run_adamerging(a.zoo, a.pretrained, a.variant, a.seen, a.finetuned, a.tasks, a.unseen,
                                      a.heads, a.data, a.adamerging, a.max_images, a.batch_size)
    write_parquet(table, a.out)


def _unseen_table(a) -> None:
    from pipeline.analysis.common import write_parquet
    from pipeline.analysis.unseen import plot_unseen

    table = pd.concat([pd.read_parquet(f) for f in a.inputs], ignore_index=True)
    write_parquet(table, a.out)
    plot_unseen(table, a.figure)


def _pem(a) -> None:
    from pipeline.analysis import pem
    from pipeline.analysis.common import write_parquet
    from pipeline.merging.lambda_search import grid

    table = pem.run(a.zoo, a.pretrained, a.tasks, a.finetuned, a.lora, a.heads, a.data, grid(**a.grid),
                    a.negation_lam, a.adamerging, a.max_images, a.batch_size)
    write_parquet(table, a.out)
    pem.plot(table, a.figure)


def add_analysis_verbs(sub: argparse._SubParsersAction) -> None:
    def verb(name, fn, *args):
        s = sub.add_parser(name)
        s.add_argument("--zoo", type=json.loads, required=True, help="the config's zoo section as JSON")
        s.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "2")))
        for flags, kw in args:
            s.add_argument(*flags, **kw)
        s.set_defaults(fn=fn)

    req = {"required": True}
    many = {"nargs": "+", "required": True}
    out, figure = (["--out"], req), (["--figure"], req)
    pretrained = (["--pretrained"], req)
    store = (["--task-vectors"], many)
    heads = (["--heads"], many)
    data = (["--data"], {"nargs": "*", "default": []})
    batch = (["--batch-size"], {"type": int, "default": 512})
    js = {"type": json.loads, "default": {}}
    verb("analysis-sensitivity", _sensitivity, pretrained, store, heads, data, batch, out, figure,
         (["--search"], many), (["--references"], {"nargs": "*", "default": []}),
         (["--settings"], {**js, "help": "merging settings per method as JSON"}),
         (["--test"], {"action": "store_true", "help": "also evaluate the grid on the test split"}))
    verb("analysis-coefficients", _coefficients, out, (["--lambdas"], many), (["--entropy"], many),
         (["--layer-figure"], req), (["--task-figure"], req), (["--entropy-figure"], req))
    verb("analysis-distances", _distances, pretrained, store, out, figure, (["--models"], many),
         (["--cosine-out"], req), (["--cosine-figure"], req))
    verb("analysis-surrogate", _surrogate, pretrained, store, heads, data, batch, out, figure,
         (["--lambdas"], {"nargs": "+", "type": float, "required": True}),
         (["--max-samples"], {"type": int, "default": 0}), (["--spearman-out"], req))
    merge_args = ((["--lambdas"], {**js, "help": "lambda of task_arithmetic and ties_merging as JSON"}),
                  (["--ties"], {**js, "help": "TIES settings as JSON"}),
                  (["--adamerging"], {**js, "help": "AdaMerging Settings fields as JSON"}),
                  (["--max-images"], {"type": int, "default": 0}))
    verb("analysis-robustness", _robustness, pretrained, store, heads, data, batch, out, *merge_args,
         (["--finetuned"], many), (["--corruption"], req), (["--severity"], {"type": int, "default": 3}),
         (["--variant"], {"default": "layer_wise"}))
    verb("analysis-robustness-table", _robustness_table, out, figure, (["--inputs"], many))
    verb("analysis-unseen", _unseen, pretrained, heads, data, batch, out, *merge_args,
         (["--task-vectors"], {"nargs": "*", "default": []}), (["--finetuned"], {"nargs": "*", "default": []}),
         (["--variant"], {**req, "help": "baselines or an AdaMerging variant"}),
         (["--tasks"], many), (["--seen"], many), (["--unseen"], many))
    verb("analysis-unseen-table", _unseen_table, out, figure, (["--inputs"], many))
    verb("analysis-pem", _pem, pretrained, heads, data, batch, out, figure, merge_args[2], merge_args[3],
         (["--tasks"], many), (["--finetuned"], many), (["--lora"], {**many, "help": "LoRA factor files"}),
         (["--grid"], {**req, "type": json.loads, "help": 'lambda grid of the addition as JSON {"start", "stop", "step"}'}),
         (["--negation-lam"], {"type": float, "default": -1.0}))
