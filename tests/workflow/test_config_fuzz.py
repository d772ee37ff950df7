"""Fuzz of the config's doors: seeded random mutations of config/micro.yaml (wrong types,
out-of-range and huge numbers, NaN, unknown keys, hostile names with shell characters, empty
lists, reversed ranges, dropped keys). Each mutated config is either refused, by the schema
or the cross-field rules (pipeline/config_checks.py), with a message naming the mutated key,
or accepted, and then the jobs' own code must accept it too: the method settings'
``configure``, Adam's argument checks, the lambda grid, the store writer and reader, the
synthetic renderer, LoRA, the corruptions, the command line's number parsing.

Most cases are judged in process, as common.smk judges them (``validate``, then
``config_checks.problems``: helpers.config.refusal); a few also run ``snakemake -n``, which must agree, and every
command line the accepted dry runs print must parse with its verb's own parser.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import random
import re
import shlex
import tempfile
from functools import cache
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from helpers.config import SCHEMA, load, refusal
from helpers.workflow import snakemake
from snakemake.utils import validate

MICRO = load("micro.yaml")
SEED = 20240917
KINDS = {"type": 8, "range": 10, "unknown": 5, "hostile": 6, "empty": 3, "order": 5, "drop": 3}  # 40 cases
DRY_RUNS = 2  # accepted and as many refused cases also run `snakemake -n`
DROP = object()

WRONG_TYPES = ["text", [1, 2], {"a": 1}, True, None, 1.5, 7]
NUMBERS = [-1, 0, -1e-9, 1e-9, 0.5, 10**30, 1e300, -1e300, float("nan"), float("inf"), 3.0, 10**6]
HOSTILE = ["x||touch INJECTED||x", "$(touch INJECTED)", "a b", "a;b", "`id`", "-rf", "--help", "..", "a/b",
           "", "x\ny", "nope"]
UNKNOWN = ["stesp", "enabeld", "lamda", "batchsize", "x"]


def defaulted(cfg: dict) -> dict:
    cfg = copy.deepcopy(cfg)
    validate(cfg, SCHEMA)
    return cfg


TEMPLATE = defaulted(MICRO)  # micro.yaml with the schema's defaults: what there is to mutate


def nodes(node, path=()):
    """(path, value) of every key, list item and the root below it."""
    yield path, node
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, value in items:
        yield from nodes(value, (*path, key))


def get(node, path):
    for part in path:
        node = node[part]
    return node


NAMES = [p for p, v in nodes(TEMPLATE) if p == ("zoo", "name") or len(p) >= 2 and isinstance(p[-1], int)
         and p[-2] == "tasks" or p in [("zoo", "heldout_tasks"), ("analysis", "robustness", "tasks"),
                                       ("analysis", "unseen", "tasks")]]
SCALARS = [p for p, v in nodes(TEMPLATE) if p and not isinstance(v, dict | list)]
NUMERIC = [p for p in SCALARS if isinstance(get(TEMPLATE, p), int | float) and not isinstance(get(TEMPLATE, p), bool)]
OBJECTS = [p for p, v in nodes(TEMPLATE) if isinstance(v, dict)]
LISTS = [p for p, v in nodes(TEMPLATE) if isinstance(v, list)]
DROPPABLE = [p for p, _ in nodes(MICRO) if p and not isinstance(p[-1], int)]
ORDERS = [
    lambda r: (("merging", "lambda_grid"), {"start": r.uniform(0.5, 2), "stop": r.uniform(-1, 0.4)}),
    lambda r: (("merging", "lambda_grid", "step"), r.choice([1e-9, 1e-5, 5e-4])),
    lambda r: (("merging", "adamerging", "clamp"), sorted([r.uniform(0, 1), r.uniform(0, 1)], reverse=True)),
    lambda r: ((*r.choice([("merging",), ("analysis", "unseen"), ("analysis", "pem")]), "adamerging", "betas"),
               [r.uniform(0, 0.99), r.choice([1.0, 1.5, -0.1])]),
    lambda r: (("analysis", r.choice(["robustness", "unseen"]), "adamerging", "init"), r.choice([-0.5, 1.5])),
    lambda r: (("merging", "chunk_mib"), r.choice([1e-9, 0.001, 1e6])),
    lambda r: (("merging", "storage"), {"codec": "blosc", "level": r.randint(0, 22)}),
    lambda r: (("zoo", "synthetic", "pretrain", "corpus"), r.choice([64, 100, 127, 128, 20000])),
]


def cases(seed: int = SEED) -> list[tuple[str, tuple, object]]:
    """(kind, path, value) of each mutation; ``path`` ends in the new key for ``unknown``."""
    r, out = random.Random(seed), []
    for kind, n in KINDS.items():
        for _ in range(n):
            if kind == "type":
                path = r.choice(SCALARS)
                old = get(TEMPLATE, path)
                value = r.choice([v for v in WRONG_TYPES if type(v) is not type(old)])
            elif kind == "range":
                path, value = r.choice(NUMERIC), r.choice(NUMBERS)
            elif kind == "unknown":
                path, value = (*r.choice(OBJECTS), r.choice(UNKNOWN)), 1
            elif kind == "hostile":
                path = r.choice(NAMES)
                value = r.choice(HOSTILE)
                value = [value] if isinstance(get(TEMPLATE, path), list) else value
            elif kind == "empty":
                path, value = r.choice(LISTS), []
            elif kind == "order":
                path, value = r.choice(ORDERS)(r)
            else:
                path, value = r.choice(DROPPABLE), DROP
            out.append((kind, path, value))
    return out


def mutated(path: tuple, value) -> dict:
    """micro.yaml with ``value`` at ``path`` (missing parents copied from the defaults)."""
    cfg = copy.deepcopy(MICRO)
    node = cfg
    for i, part in enumerate(path[:-1]):
        if isinstance(node, dict) and part not in node:
            node[part] = copy.deepcopy(get(TEMPLATE, path[: i + 1]))
        node = node[part]
    if value is DROP:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return cfg


def names_the_key(message: str, kind: str, path: tuple) -> bool:
    """Whether ``message`` names the mutated key: as the schema does (``['merging']['lr']``)
    or as the cross-field rules do (``merging.lambda_grid.step``, or the section and the key:
    ``merging.lambda_grid: start ...``)."""
    keys = [p for p in path if not isinstance(p, int)]
    if kind == "unknown":
        return f"'{keys[-1]}' was unexpected" in message
    if kind == "drop":
        return repr(keys[-1]) in message
    dotted, bracket = ".".join(keys), "".join(f"[{k!r}]" for k in keys)
    return (dotted in message or bracket in message
            or ".".join(keys[:-1]) in message and re.search(rf"\b{keys[-1]}\b", message) is not None)


# -- what the jobs' own code refuses ------------------------------------------------------


def typed(settings, where: str) -> list[str]:
    """Fields of a settings dataclass whose values have not their annotated type, or are
    numbers beyond float32 (the jobs compute in it)."""
    import torch

    out = []
    for field in dataclasses.fields(settings):
        value = getattr(settings, field.name)
        values = value if isinstance(value, tuple) else (value,)
        name = field.type if isinstance(field.type, str) else field.type.__name__
        want = {"int": int, "str": str, "bool": bool}.get(name, float)  # float, tuple[float, float]
        for v in values:
            if want is float and (isinstance(v, bool) or not isinstance(v, int | float)) \
                    or want is not float and (not isinstance(v, want) or want is int and isinstance(v, bool)):
                out.append(f"{where}.{field.name}: {v!r} is no {want.__name__}")
            elif want is float and not torch.tensor(float(v), dtype=torch.float32).isfinite():
                out.append(f"{where}.{field.name}: {v!r} is no finite float32")
    return out


@cache
def tiny_encoder():
    from pipeline.models.clip import SYNTHETIC_ARCH, create_model

    return create_model(SYNTHETIC_ARCH).visual


class OneChunkStore:
    """The reader's view of a store whose largest tensor spans a whole chunk (any real model)."""

    def __init__(self, tasks, elements):
        self.tasks, self.elements = list(tasks), elements

    def spans(self):
        yield "w", slice(0, self.elements)


CLI_INTS = ["evaluation.batch_size", "merging.adamerging.max_images", "analysis.robustness.severity",
            "analysis.surrogate.max_samples", "analysis.robustness.max_images", "analysis.unseen.max_images",
            "analysis.pem.max_images", "threads", "merging.adamerging.gpus", "zoo.images.workers"]
CLI_FLOATS = ["merging.chunk_mib", "merging.budget_mib", "merging.task_negation.lam", "analysis.robustness.lam",
              "analysis.unseen.lam"]


def job_rejections(cfg: dict) -> list[str]:
    """What the jobs' own code refuses of ``cfg`` (validated, defaults filled)."""
    import numpy as np
    import torch

    from pipeline.analysis.corruptions import corrupt
    from pipeline.commands.loading import job_seed
    from pipeline.merging import lambda_search, registry
    from pipeline.merging.adamerging import lambda_optimizer
    from pipeline.store.streaming import Reader
    from pipeline.store.task_vectors import Storage, chunk_elements, write_diffs
    from pipeline.zoo import synthetic_zoo
    from pipeline.zoo.lora import add_adapters

    out: list[str] = []

    def attempt(what, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as err:  # noqa: BLE001 (any refusal counts)
            out.append(f"{what}: {type(err).__name__}: {err}")

    zoo, merging, analysis = cfg["zoo"], cfg["merging"], cfg["analysis"]
    tasks = zoo["tasks"] + zoo["heldout_tasks"]
    # method settings, as the merge, lambda-search, adamerge and analysis verbs configure them
    for name in ("ties_merging", "fisher_merging", "regmean", "regmean_plusplus"):
        if (s := attempt(name, registry.method(name).configure, merging[name])) is not None:
            out += typed(s, f"merging.{name}")
    attempt("task_negation", registry.method("task_negation").configure, {"lam": merging["task_negation"]["lam"]})
    if (s := attempt("multitask", registry.method("multitask").configure, zoo["synthetic"]["finetune"])) is not None:
        out += typed(s, "zoo.synthetic.finetune")
    base = {k: v for k, v in merging["adamerging"].items() if k not in ("max_images", "gpus")}
    for where, own in [("merging.adamerging", {})] + [(f"analysis.{a}.adamerging", analysis[a]["adamerging"])
                                                      for a in ("robustness", "unseen", "pem")]:
        s = attempt(where, registry.method("adamerging_task_wise").configure, base | own)
        if s is not None:
            out += typed(s, where)
            model = SimpleNamespace(lambda_raw=torch.zeros(1, requires_grad=True))
            attempt(f"{where} Adam", lambda_optimizer, model, s)
    # the lambda grid (a billion points is std::bad_alloc; more than 1000 a search no one meant)
    grid = merging["lambda_grid"]
    n = (grid["stop"] - grid["start"]) / grid["step"]
    if not math.isfinite(n) or n > 1e6:
        out.append(f"lambda grid: {n} points")
    elif (points := attempt("lambda grid", lambda_search.grid, **grid)) is not None and len(points) > 1000:
        out.append(f"lambda grid: {len(points)} points")
    # the store: written with its storage settings, read within the budget
    storage = attempt("storage", Storage, **merging["storage"])
    if storage is not None:
        elements = attempt("chunk_mib", chunk_elements, merging["chunk_mib"], storage.itemsize)
        with tempfile.TemporaryDirectory() as tmp:
            attempt("store write", write_diffs, Path(tmp) / "tv.zarr", "t", [("w", torch.ones(64), torch.float32)],
                    "base", "source", merging["chunk_mib"], storage)
        if elements is not None:
            reader = attempt("store read", Reader, OneChunkStore(zoo["tasks"], elements), merging["budget_mib"])
            if reader is not None:
                reader._pool.shutdown()
    # the synthetic zoo: seeds, task rendering (small sizes), pretraining batches, LoRA
    seed = attempt("zoo.seed", job_seed, zoo, "fuzz")
    if seed is not None:
        attempt("zoo.seed torch", torch.manual_seed, seed)
    syn = zoo["synthetic"]
    sizes = {k: min(v, 16) if isinstance(v, int) else v for k, v in syn["sizes"].items()}
    for task in tasks:
        attempt(f"task data {task}", synthetic_zoo.build_task_data, task, zoo["seed"], sizes, syn["domains"])
    pretrain = syn["pretrain"]
    attempt("pretrain batches", np.random.default_rng(0).choice, pretrain["corpus"], pretrain["batch_size"],
            replace=False)
    for name, schedule in [("pretrain", pretrain), ("finetune", syn["finetune"]),
                           ("lora", syn["finetune"] | analysis["pem"]["lora"])]:
        for key in ("steps", "batch_size", "warmup", "corpus", "rank"):
            if key in schedule and (not isinstance(schedule[key], int) or isinstance(schedule[key], bool)):
                out.append(f"{name}.{key}: {schedule[key]!r} is no integer")
        attempt(f"{name} AdamW", torch.optim.AdamW, [torch.zeros(1, requires_grad=True)], lr=schedule["lr"],
                weight_decay=schedule["weight_decay"])
    lora = analysis["pem"]["lora"]
    rank = min(lora["rank"], 16) if isinstance(lora["rank"], int) else lora["rank"]  # the check, not 10**6 rows
    attempt("lora", add_adapters, copy.deepcopy(tiny_encoder()), rank, lora["alpha"], 0)
    # the analyses
    image = np.zeros((1, 32, 32, 3), np.uint8)
    for name in analysis["robustness"]["corruptions"]:
        attempt(f"corruption {name}", corrupt, image, name, analysis["robustness"]["severity"])
    for name in ("robustness", "unseen"):
        if unknown := [t for t in analysis[name]["tasks"] if t not in tasks]:
            out.append(f"analysis.{name}.tasks: no files for {unknown}")
    for lam in analysis["surrogate"]["lambdas"]:
        if not torch.tensor(float(lam), dtype=torch.float32).isfinite():
            out.append(f"surrogate lambda {lam}")
    # numbers on command lines: argparse's int() and float() of the formatted value
    for keys, parse in ((CLI_INTS, int), (CLI_FLOATS, float)):
        for key in keys:
            *parents, leaf = key.split(".")
            section = get(cfg, parents)
            if leaf in section:  # analysis.*.max_images: else merging.adamerging's
                attempt(key, parse, str(section[leaf]))
    return out


@cache
def verdicts() -> list[tuple[str, tuple, object, str | None]]:
    return [(kind, path, value, refusal(mutated(path, value))) for kind, path, value in cases()]


def label(kind, path, value) -> str:
    return f"{kind}:{'.'.join(map(str, path))}={'<drop>' if value is DROP else repr(value)[:40]}"


def test_the_cases_cover_each_kind_and_both_verdicts():
    found = verdicts()
    assert len(found) == sum(KINDS.values())
    assert len({label(*c[:3]) for c in found}) >= len(found) - 3  # few repeats
    refused = [c for c in found if c[3] is not None]
    assert 0.3 * len(found) < len(refused) < len(found)
    assert {c[0] for c in refused} >= set(KINDS) - {"drop"}  # most keys of micro.yaml have defaults


@pytest.mark.parametrize("i", range(sum(KINDS.values())))
def test_a_mutation_is_refused_naming_its_key_or_accepted_by_the_jobs(i):
    kind, path, value, why = verdicts()[i]
    if why is not None:
        assert names_the_key(why, kind, path), f"{label(kind, path, value)}:\n{why}"
    else:
        rejected = job_rejections(defaulted(mutated(path, value)))
        assert not rejected, f"{label(kind, path, value)} passes the config checks, but the jobs refuse: {rejected}"


def commands(log: str) -> list[list[str]]:
    """The argv of every ``adamerge VERB ...`` a dry run with -p prints (log redirect cut)."""
    out = []
    for line in log.splitlines():
        if m := re.match(r"\s*Shell command: adamerge (.*)$", line):
            argv = shlex.split(m[1])
            out.append(argv[: argv.index(">")] if ">" in argv else argv)
    return out


def test_dry_runs_agree_with_the_in_process_verdicts(tmp_path: Path):
    """A few cases through ``snakemake -n -p``: a refused config fails naming the key; an
    accepted one plans its jobs, each command line parsing with its verb's own parser."""
    from pipeline import cli

    found = verdicts()
    accepted = [c for c in found if c[3] is None][:DRY_RUNS]
    refused = [c for c in found if c[3] is not None][:DRY_RUNS]
    for n, (kind, path, value, why) in enumerate(accepted + refused):
        work = tmp_path / str(n)
        work.mkdir()
        (work / "run.yaml").write_text(yaml.safe_dump(mutated(path, value)))
        proc = snakemake("-n", "-p", "--configfile", "run.yaml", cwd=work, check=False)
        log = proc.stdout + proc.stderr
        assert not (work / "resources").exists() and not (work / "INJECTED").exists()
        if why is not None:
            assert proc.returncode != 0, f"{label(kind, path, value)} passes the dry run"
            assert names_the_key(log, kind, path), f"{label(kind, path, value)}:\n{log[-3000:]}"
            continue
        assert proc.returncode == 0, f"{label(kind, path, value)}:\n{log[-3000:]}"
        argvs = commands(log)
        assert len(argvs) > 50
        for argv in argvs:
            try:
                cli.build_parser([argv[0]]).parse_args(argv)
            except SystemExit:
                pytest.fail(f"{label(kind, path, value)}: the {argv[0]} parser refuses {argv}")
