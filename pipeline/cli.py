"""Command line of the pipeline: one verb per workflow step (``python -m pipeline VERB``).

Rules of the Snakemake workflow call these verbs and nothing else; each verb is a thin
wrapper around one library function.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import zlib
from pathlib import Path

import torch

log = logging.getLogger("pipeline")


def _json(text: str) -> dict:
    return json.loads(text)


def _threads(n: int) -> None:
    torch.set_num_threads(max(1, n))


def cmd_task_data(a) -> None:
    import numpy as np

    from pipeline.io import atomic_path
    from pipeline.zoo.synthetic_zoo import build_task_data

    syn = a.zoo["synthetic"]
    data = build_task_data(a.task, a.zoo["seed"], syn["sizes"], syn["domains"])
    with atomic_path(a.out) as tmp, open(tmp, "wb") as f:  # a file object: numpy appends no .npz
        np.savez_compressed(f, **data)
    log.info("task %s: %s", a.task, {k: v.shape for k, v in data.items()})


def cmd_pretrain(a) -> None:
    from pipeline.data.synthetic import vocabulary
    from pipeline.models.checkpoints import save_state_dict
    from pipeline.io import write_json
    from pipeline.zoo.synthetic_zoo import pretrain

    cfg = dict(a.zoo["synthetic"]["pretrain"], arch=a.zoo["arch"])
    model, tokenizer = pretrain(cfg, a.zoo["seed"])
    write_json({"words": vocabulary(), "context_length": tokenizer.context_length}, Path(a.tokenizer))
    save_state_dict(model.state_dict(), a.out)


def cmd_import_pretrained(a) -> None:
    from pipeline.models.checkpoints import save_state_dict
    from pipeline.models.pretrained import load_pretrained_clip

    model, _, _ = load_pretrained_clip(a.zoo["arch"], a.zoo["pretrained"])
    save_state_dict(model.state_dict(), a.out)


def cmd_head(a) -> None:
    from pipeline.data.tasks import task_prompts
    from pipeline.models.clip import zero_shot_weights
    from pipeline.zoo.store import load_clip, load_tokenizer, save_head

    model = load_clip(a.zoo, a.pretrained)
    tokenizer = load_tokenizer(a.zoo, Path(a.pretrained).parent)
    classnames, templates = task_prompts(a.zoo, a.task)
    save_head(zero_shot_weights(model, tokenizer, classnames, templates), a.out)


def _job_seed(zoo: dict, name: str) -> int:
    """A seed of its own for the job ``name`` (a task, ...), derived from the zoo's seed."""
    return zoo["seed"] * 100_003 + zlib.crc32(name.encode()) % 100_000


def cmd_finetune(a) -> None:
    from pipeline.data.tasks import as_tensors, load_split
    from pipeline.models.checkpoints import save_state_dict
    from pipeline.zoo.store import load_clip, load_head
    from pipeline.zoo.synthetic_zoo import finetune

    model = load_clip(a.zoo, a.pretrained)
    x, y = as_tensors(load_split(a.zoo, a.task, "train", a.data))
    seed = _job_seed(a.zoo, a.task)
    sd = finetune(model.visual, load_head(a.head), x, y, a.zoo["synthetic"]["finetune"], seed, desc=f"finetune {a.task}")
    save_state_dict(sd, a.out)


def cmd_lora_finetune(a) -> None:
    from pipeline.data.tasks import as_tensors, load_split
    from pipeline.models.checkpoints import save_state_dict
    from pipeline.zoo.lora import add_adapters, factors
    from pipeline.zoo.store import load_clip, load_head
    from pipeline.zoo.synthetic_zoo import train_encoder

    encoder = load_clip(a.zoo, a.pretrained).visual
    x, y = as_tensors(load_split(a.zoo, a.task, "train", a.data))
    seed = _job_seed(a.zoo, f"lora {a.task}")
    settings = _json(a.settings)
    adapters = add_adapters(encoder, settings.get("rank", 4), settings.get("alpha", 8.0), seed)
    cfg = a.zoo["synthetic"]["finetune"] | {k: v for k, v in settings.items() if k not in ("rank", "alpha")}
    train_encoder(encoder, [(load_head(a.head), x, y)], cfg, seed, desc=f"LoRA {a.task}")
    save_state_dict(factors(adapters), a.out)


def cmd_import_finetuned(a) -> None:
    from pipeline.models.checkpoints import check_compatible, load_state_dict, save_state_dict
    from pipeline.zoo.store import load_clip

    source = a.zoo["checkpoints"].format(task=a.task)
    sd = load_state_dict(source, trust_pickles=a.zoo.get("trust_pickles", False))
    reference = load_clip(a.zoo, a.pretrained).visual.state_dict()
    check_compatible(reference, sd, a.pretrained, source)
    save_state_dict(sd, a.out)


def cmd_task_vector(a) -> None:
    from pipeline.store.task_vectors import Storage, write_task_vector
    from pipeline.zoo.store import load_clip, load_encoder_state

    pretrained = load_clip(a.zoo, a.pretrained).visual.state_dict()
    out = Path(a.out)
    write_task_vector(out.parent, a.task, pretrained, load_encoder_state(a.finetuned), a.finetuned, a.chunk_mib,
                      Storage(**_json(a.storage)))


def _open_store(a):
    from pipeline.models.checkpoints import state_dict_hash
    from pipeline.store.task_vectors import TaskVectorStore
    from pipeline.zoo.store import load_clip

    roots = {Path(p).parent for p in a.task_vectors}
    if len(roots) != 1:
        raise ValueError(f"--task-vectors must be subgroups of one store, got folders {sorted(map(str, roots))}")
    a.tasks = [Path(p).name for p in a.task_vectors]
    model = load_clip(a.zoo, a.pretrained)
    pretrained = {k: v.clone() for k, v in model.visual.state_dict().items()}  # not views of the encoder's weights
    return model.visual, pretrained, TaskVectorStore(roots.pop(), a.tasks, base_hash=state_dict_hash(pretrained))


def _write_merge(state_dict: dict, out: str, record: dict) -> None:
    from pipeline.models.checkpoints import save_state_dict
    from pipeline.io import write_json

    save_state_dict(state_dict, out)
    write_json(record, Path(out).with_suffix(".json"))


def cmd_merge(a) -> None:
    import importlib

    from pipeline.merging import STORE_METHODS

    if a.method not in STORE_METHODS:
        raise ValueError(f"merge: unknown method {a.method!r}; task-vector methods: {STORE_METHODS}")
    from pipeline.io import write_json
    from pipeline.merging import default_device
    from pipeline.store.streaming import merge_to_file

    _, pretrained, store = _open_store(a)
    settings = _json(a.settings)
    reducer = importlib.import_module(f"pipeline.merging.{a.method}").reducer(store, **settings)
    summary = merge_to_file(store, reducer, pretrained, a.out, a.budget_mib, default_device(), desc=a.method)
    log.info("%s: %d passes, %.0f MiB read, %.1f s", a.method, summary["passes"], summary["bytes_read"] / 2**20,
             summary["seconds"])
    write_json({"method": a.method, "settings": settings, "tasks": a.tasks, **store.describe()},
               Path(a.out).with_suffix(".json"))


def cmd_lambda_search(a) -> None:
    import importlib

    import pandas as pd

    from pipeline.io import write_parquet
    from pipeline.data.tasks import load_split
    from pipeline.merging import SEARCH_METHODS, apply_vector
    from pipeline.merging.lambda_search import grid, search
    from pipeline.zoo.store import load_head

    if a.method not in SEARCH_METHODS:
        raise ValueError(f"lambda-search: unknown method {a.method!r}; searchable methods: {SEARCH_METHODS}")
    encoder, pretrained, store = _open_store(a)
    settings, lambdas = _json(a.settings), grid(**_json(a.grid))
    vector = importlib.import_module(f"pipeline.merging.{a.method}").vector(store, **settings)
    data_files = a.data or [None] * len(a.tasks)
    val = [(t, load_head(h), load_split(a.zoo, t, "val", f)) for t, h, f in zip(a.tasks, a.heads, data_files, strict=True)]
    rows, best = search(encoder, pretrained, vector, lambdas, val, a.method, a.batch_size)
    log.info("%s: best lambda %s on validation", a.method, best)
    write_parquet(pd.DataFrame(rows), a.search_out)
    _write_merge(apply_vector(pretrained, vector, best), a.out,
                 {"method": a.method, "settings": {**settings, "lam": best}, "lambda_grid": lambdas,
                  "tasks": a.tasks, **store.describe()})


def cmd_merge_with_data(a) -> None:
    import importlib

    from pipeline.data.tasks import load_split
    from pipeline.merging import DATA_METHODS
    from pipeline.zoo.store import load_clip, load_encoder_state, load_head

    if a.method not in DATA_METHODS:
        raise ValueError(f"merge-with-data: unknown method {a.method!r}; methods: {DATA_METHODS}")
    encoder = load_clip(a.zoo, a.pretrained).visual
    settings = _json(a.settings)
    data_files = a.data or [None] * len(a.tasks)
    tasks = ((t, load_encoder_state(f), load_head(h), load_split(a.zoo, t, "train", d))
             for t, f, h, d in zip(a.tasks, a.finetuned, a.heads, data_files, strict=True))
    merged = importlib.import_module(f"pipeline.merging.{a.method}").merge(encoder, tasks, seed=a.zoo["seed"], **settings)
    _write_merge(merged, a.out, {"method": a.method, "settings": settings, "tasks": a.tasks})


def cmd_multitask(a) -> None:
    from pipeline.data.tasks import as_tensors, load_split
    from pipeline.merging.multitask import merge
    from pipeline.zoo.store import load_clip, load_head

    encoder = load_clip(a.zoo, a.pretrained).visual
    tasks = [(load_head(h), *as_tensors(load_split(a.zoo, t, "train", d)))
             for t, h, d in zip(a.tasks, a.heads, a.data, strict=True)]
    cfg = a.zoo["synthetic"]["finetune"]
    _write_merge(merge(encoder, tasks, cfg, a.zoo["seed"]), a.out, {"method": "multitask", "settings": cfg, "tasks": a.tasks})


def cmd_evaluate(a) -> None:
    import pandas as pd

    from pipeline.io import write_parquet
    from pipeline.data.tasks import load_split
    from pipeline.evaluation import accuracy
    from pipeline.zoo.store import load_clip, load_encoder_state, load_head

    model = load_clip(a.zoo, a.pretrained)
    encoder = model.visual
    if a.encoder:
        encoder.load_state_dict(load_encoder_state(a.encoder))
    rows = []
    data_files = a.data or [None] * len(a.tasks)
    for task, head, data_file in zip(a.tasks, a.heads, data_files, strict=True):
        data = load_split(a.zoo, task, a.split, data_file)
        r = accuracy(encoder, load_head(head), data, a.batch_size, desc=f"{a.model} on {task}")
        rows.append({"model": a.model, "method": a.method, "task": task, "split": a.split, **r})
        log.info("%s on %s: %.2f%% (n=%d)", a.model, task, r["accuracy"], r["n"])
    write_parquet(pd.DataFrame(rows), a.out)


def cmd_report(a) -> None:
    from pipeline.report import write_report

    benchmarks = sorted(str(p) for p in Path(a.benchmark_dir).glob("*/*.tsv"))
    analysis = dict(item.split("=", 1) for item in a.analysis)
    write_report(a.eval, _json(a.config), benchmarks, a.zoo, Path(a.markdown), Path(a.html), Path(a.table), analysis)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pipeline", description=__doc__)
    sub = p.add_subparsers(dest="verb", required=True)

    def verb(name, fn, *args):
        s = sub.add_parser(name)
        s.add_argument("--zoo", type=_json, required=True, help="the config's zoo section as JSON")
        s.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "2")))
        for arg in args:
            s.add_argument(*arg[0], **arg[1])
        s.set_defaults(fn=fn)

    out = (["--out"], {"required": True})
    task = (["--task"], {"required": True})
    pretrained = (["--pretrained"], {"required": True})
    verb("task-data", cmd_task_data, task, out)
    verb("pretrain", cmd_pretrain, out, (["--tokenizer"], {"required": True}))
    verb("import-pretrained", cmd_import_pretrained, out)
    verb("head", cmd_head, task, pretrained, out)
    verb("finetune", cmd_finetune, task, pretrained, (["--head"], {"required": True}), (["--data"], {"required": True}), out)
    verb("lora-finetune", cmd_lora_finetune, task, pretrained, (["--head"], {"required": True}),
         (["--data"], {"required": True}),
         (["--settings"], {"default": "{}", "help": "rank, alpha and fine-tuning overrides (steps, lr, ...) as JSON"}), out)
    verb("import-finetuned", cmd_import_finetuned, task, pretrained, out)
    store = (["--task-vectors"], {"nargs": "+", "required": True, "help": "task subgroups of the zoo's task_vectors.zarr"})
    tasks = (["--tasks"], {"nargs": "+", "required": True})
    method = (["--method"], {"required": True})
    settings = (["--settings"], {"default": "{}", "help": "the method's keyword arguments as JSON"})
    heads_data = ((["--heads"], {"nargs": "+", "required": True}),
                  (["--data"], {"nargs": "*", "default": [], "help": "synthetic task files, one per task"}))
    verb("task-vector", cmd_task_vector, task, pretrained, (["--finetuned"], {"required": True}),
         (["--chunk-mib"], {"type": float, "default": 4.0}),
         (["--storage"], {"default": "{}", "help": 'store element type and codec as JSON {"dtype", "codec", "level"}'}), out)
    verb("merge", cmd_merge, pretrained, method, store, settings, out,
         (["--budget-mib"], {"type": float, "default": 1024, "help": "memory for blocks in flight (MiB)"}))
    verb("lambda-search", cmd_lambda_search, pretrained, method, store, settings, *heads_data,
         (["--grid"], {"required": True, "help": 'lambda grid as JSON {"start", "stop", "step"}'}), (["--search-out"], {"required": True}),
         (["--batch-size"], {"type": int, "default": 512}), out)
    verb("merge-with-data", cmd_merge_with_data, pretrained, method, tasks, (["--finetuned"], {"nargs": "+", "required": True}),
         *heads_data, settings, out)
    verb("multitask", cmd_multitask, pretrained, tasks, *heads_data, out)
    verb("evaluate", cmd_evaluate, pretrained, (["--model"], {"required": True}), (["--method"], {"required": True}),
         (["--encoder"], {"default": None}), (["--tasks"], {"nargs": "+", "required": True}),
         (["--heads"], {"nargs": "+", "required": True}), (["--data"], {"nargs": "*", "default": [], "help": "synthetic task files, one per task"}),
         (["--split"], {"default": "test"}), (["--batch-size"], {"type": int, "default": 512}), out)
    verb("report", cmd_report, (["--eval"], {"nargs": "+", "required": True}), (["--config"], {"required": True, "help": "the run's config as JSON"}),
         (["--benchmark-dir"], {"required": True}), (["--markdown"], {"required": True}),
         (["--html"], {"required": True}), (["--table"], {"required": True}),
         (["--analysis"], {"nargs": "*", "default": [], "help": "analysis outputs as NAME=PATH"}))
    from pipeline.merging.adamerging import add_adamerging_verb

    add_adamerging_verb(sub)
    from pipeline.analysis.cli import add_analysis_verbs

    add_analysis_verbs(sub)
    return p


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    args = build_parser().parse_args(argv)
    _threads(args.threads)
    args.fn(args)
