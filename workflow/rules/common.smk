import functools
import json
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

from snakemake.utils import validate

validate(config, "../schemas/config.schema.yaml")

sys.path.insert(
    0, workflow.basedir
)  # the project's own packages, whatever the working directory

from pipeline import cli, config_checks, job_server, provenance
from pipeline.data import suites
from pipeline.merging import registry
from pipeline.merging.contract import Need

ZOO_CFG = config["zoo"]
ZOO = ZOO_CFG["name"]
SOURCE = ZOO_CFG["source"]
SYNTHETIC = SOURCE == "synthetic"
HUB_DATA = (
    "datasets" in ZOO_CFG
)  # images from the suite's Hub datasets, else from data_root
if "tasks" not in ZOO_CFG:  # the suite's tasks
    ZOO_CFG["tasks"] = [t.name for t in suites.suite(ZOO_CFG["suite"])]
# What JSON Schema cannot say (orders, sizes from several keys, task references), refused
# before any job with each key and its fix (pipeline/config_checks.py).
config_checks.check(config)
TASKS = list(ZOO_CFG["tasks"])
HELDOUT = list(ZOO_CFG["heldout_tasks"])
ALL_TASKS = TASKS + HELDOUT
THREADS = config["threads"]
MODELS = f"resources/models/{ZOO}"
DATA = f"resources/data/{ZOO}"
RESULTS = f"results/{ZOO}"
LOGS = f"logs/{ZOO}"
BENCH = f"{RESULTS}/benchmarks"
STORE = f"{RESULTS}/task_vectors.zarr"

# Method lists, all from the registry (pipeline/merging/registry.py). The searched methods
# (Task Arithmetic, TIES) take lambda from the validation split (rule lambda_search), or with
# merging.lambda_choice fixed their settings' lam, merged like the other store methods; their
# lambda search then still runs for the sensitivity analysis' validation curves.
FIXED_LAMBDA = config["merging"]["lambda_choice"] == "fixed"
STORE_MERGES = registry.names(
    registry.STORE, searched=None if FIXED_LAMBDA else False
)  # one streamed pass over the store
SEARCH_METHODS = registry.names(searched=True)  # lambda searched on validation data
# --grid of the lambda searches and the sensitivity test curves
LAMBDA_GRID = json.dumps(config["merging"]["lambda_grid"], sort_keys=True)
DATA_METHODS = registry.names(
    registry.MODELS_AND_TRAIN
)  # fine-tuned models and training examples
TRAINED = registry.names(
    frozenset({Need.TRAIN_DATA}), synthetic=SYNTHETIC
)  # joint training
MERGE_METHODS = [
    m
    for m in registry.names(synthetic=SYNTHETIC)
    if Need.TEST_DATA not in registry.method(m).needs
]
ADAMERGING_VARIANTS = registry.adamerging_variants()
TEST_TIME_METHODS = [
    m
    for m in registry.test_time_methods(synthetic=SYNTHETIC)
    if config["merging"][m]["enabled"]
]  # Surgery, WEMoE: workflow/rules/test_time.smk
NEGATED = TASKS if config["merging"]["task_negation"]["enabled"] else []
# The merges that are one encoder each (a routed merge is one per task): the models of the
# distance analysis and the bases Surgery may build on.
MERGED_MODELS = {
    m: f"{RESULTS}/merges/{m}/model.safetensors"
    for m in MERGE_METHODS
    if registry.method(m).route is None
} | {
    f"adamerging_{v}": f"{RESULTS}/adamerging/{v}/model.safetensors"
    for v in ADAMERGING_VARIANTS
}
ENV = "../envs/pipeline.yaml"

# Rules call `adamerge VERB ...`: a shell function running `python -m pipeline` with the
# interpreter that runs Snakemake (no activated venv needed; under --sdm conda the env's),
# the project on the path, from any working directory.
USE_ENVS = bool(workflow.deployment_settings.deployment_method)
PYTHON = "python" if USE_ENVS else shlex.quote(sys.executable)
shell.prefix(
    f"set -euo pipefail; export PYTHONPATH={shlex.quote(workflow.basedir)}:${{{{PYTHONPATH:-}}}}; "
    f'adamerge() {{{{ {PYTHON} -m pipeline "$@"; }}}}; '
)


def start_job_server():
    """Start the job server (pipeline/job_server.py) for a local run: one process that has
    imported torch, open_clip and the pipeline forks each job instead of a fresh interpreter
    importing them again (about 8 s a job). Not for cluster or conda runs, or with
    `job_server: false`. It exits with Snakemake."""
    if not (config["job_server"] and workflow.local_exec and not USE_ENVS):
        return
    address = Path(tempfile.mkdtemp(prefix="adamerge-")) / "jobs.sock"
    # the environment of a job's shell (shell.prefix above), so that jobs match the server's
    pythonpath = f"{workflow.basedir}:{os.environ.get('PYTHONPATH', '')}"
    env = os.environ | {"PYTHONPATH": pythonpath}
    Path(LOGS).mkdir(parents=True, exist_ok=True)
    with open(f"{LOGS}/job_server.log", "w") as log:
        job_server.start(str(address), os.getpid(), env, log)
    deadline = time.monotonic() + 30
    while not address.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    if address.exists():  # else the jobs run as fresh processes, as without a server
        os.environ[job_server.ENV] = str(address)


@functools.cache
def code_version(verb, *methods):
    """Hash of the code a job of ``verb`` runs: its command module, everything that imports
    inside pipeline/ and kernels/, and the modules of the ``methods`` it runs by name
    (pipeline/provenance.py). As a param, it reruns the job when that code changes. Computed
    once per verb and methods in a Snakemake run, not once per job."""
    modules = [cli.command_module(verb), "pipeline.cli", "pipeline.__main__"]
    modules += [registry.method(m).run.__module__ for m in methods]
    return provenance.code_version(workflow.basedir, modules)


if not SYNTHETIC and not HUB_DATA:
    from pipeline.data.paper_datasets import PAPER_DATASETS

    unread = [t for t in ALL_TASKS if t not in PAPER_DATASETS]
    if unread:
        raise ValueError(
            f"config: tasks {unread} have no reader for zoo.data_root (it reads the 8 paper datasets "
            f"{list(PAPER_DATASETS)}); set `datasets: {{source: hub}}` to read every suite task from the Hub"
        )


def zoo_json(*sections):
    """The zoo settings that a job depends on, as JSON. It holds the identity keys and the
    named dotted sections; task lists are left out so that adding a task does not change
    the params of per-task jobs."""
    keep = [
        "name",
        "source",
        "arch",
        "seed",
        "trust_pickles",
        "data_root",
        "datasets",
    ]
    out = {k: ZOO_CFG[k] for k in keep if k in ZOO_CFG}
    for section in sections:
        head, _, tail = section.partition(".")
        value = ZOO_CFG[head][tail] if tail else ZOO_CFG[head]
        out.setdefault(head, {})
        if tail:
            out[head][tail] = value
        else:
            out[head] = value
    return json.dumps(out, sort_keys=True)


# Real zoos: where the pretrained CLIP, the fine-tuned encoders and the images come from.
# A Hub download's output is a manifest (its snapshot folder, commit and file checksums).
DOWNLOADS = f"{MODELS}/downloads"
PRETRAINED_MANIFEST = f"{DOWNLOADS}/pretrained.json"
FINETUNED_MANIFEST = f"{DOWNLOADS}/finetuned/{{task}}.json"
DATASET_MANIFEST = f"{DATA}/downloads/{{task}}.json"
PRETRAINED = ZOO_CFG.get("pretrained")  # absent for synthetic zoos
CHECKPOINTS = ZOO_CFG.get("checkpoints")


def revision(spec, task=None, default="main"):
    """The pinned revision of a Hub spec (``revisions[task]``, else ``revision``, else
    ``default``)."""
    return spec.get("revisions", {}).get(task, spec.get("revision", default))


def is_path(source):
    """A pretrained source given as a local path (else an open_clip tag)."""
    return "/" in source or Path(source).exists()


def local_files(path):
    """A local checkpoint as the inputs of its import (the file, or every file of a
    folder: a Hugging Face save_pretrained directory); a replaced one reruns it."""
    folder = Path(path)
    if folder.is_dir():
        return sorted(str(f) for f in folder.iterdir() if f.is_file())
    return [path]


def checkpoint_path(task):
    """The local fine-tuned checkpoint of ``task`` (None when it comes from the Hub)."""
    if isinstance(CHECKPOINTS, str):
        return fill(CHECKPOINTS, task)
    if "paths" in CHECKPOINTS:
        if task not in CHECKPOINTS["paths"]:
            raise ValueError(
                f"config: zoo.checkpoints.paths has no entry for task {task!r}; add its path "
                f"(tasks with paths: {sorted(CHECKPOINTS['paths'])})"
            )
        return CHECKPOINTS["paths"][task]
    return None


def fill(pattern, task):
    """``pattern`` with ``{task}`` (and ``{hub_name}``) filled in for ``task``."""
    return pattern.format(
        task=task,
        hub_name=suites.task(task).hub_name if "{hub_name}" in pattern else "",
    )


def pretrained_source():
    """Inputs of the pretrained import: its manifest, its local files, or none (a tag)."""
    if isinstance(PRETRAINED, dict):
        return [PRETRAINED_MANIFEST]
    return local_files(PRETRAINED) if is_path(PRETRAINED) else []


# The *_args helpers return argument lists: the rules quote each item (`{params.source:q}`).
def pretrained_args():
    if isinstance(PRETRAINED, dict):
        return ["--manifest", PRETRAINED_MANIFEST]
    return ["--source", PRETRAINED]


def finetuned_source(task):
    """Inputs of a fine-tuned import: its manifest or its local files."""
    path = checkpoint_path(task)
    return [FINETUNED_MANIFEST.format(task=task)] if path is None else local_files(path)


def finetuned_args(task):
    path = checkpoint_path(task)
    if path is None:
        return ["--manifest", FINETUNED_MANIFEST.format(task=task)]
    return ["--checkpoint", path]


def dataset_source(task):
    """Inputs of a task's image decoding: the Hub dataset's manifest, or none (data_root)."""
    return [DATASET_MANIFEST.format(task=task)] if HUB_DATA else []


def dataset_args(task):
    return ["--manifest", DATASET_MANIFEST.format(task=task)] if HUB_DATA else []


def dataset_patterns(task):
    """``--allow-patterns`` of a task's dataset download: the parquet files of its splits in
    its config (the Hub's layouts, pipeline/hub.py), not the repo's other configs or splits.
    """
    spec = suites.task(task)
    where = f"{spec.config}/" if spec.config else "*"
    splits = [s for s in (spec.train_split, spec.val_split, spec.test_split) if s]
    patterns = [
        f"{where}{p}"
        for s in splits
        for p in (f"{s}-*.parquet", f"{s}.parquet", f"{s}/*.parquet")
    ]
    return patterns


# Training images decoded per task: what Fisher merging, RegMean and RegMean++ read.
TRAIN_EXAMPLES = max(
    config["merging"][m]["examples"]
    for m in ("fisher_merging", "regmean", "regmean_plusplus")
)


def finetuned(tasks):
    return [f"{MODELS}/finetuned/{t}.safetensors" for t in tasks]


def heads(tasks):
    return [f"{MODELS}/heads/{t}.safetensors" for t in tasks]


def task_data(tasks, *splits):
    """Input files of the tasks' images: the synthetic task files, or for real zoos the
    decoded image caches of ``splits`` (default: test), one rule job per task and split.
    """
    if SYNTHETIC:
        return [f"{DATA}/{t}.npz" for t in tasks]
    return [image_cache(t, s) for t in tasks for s in splits or ("test",)]


def data_args(tasks):
    """``--data`` of the commands: the synthetic task files, or each task's cache folder."""
    return [f"{DATA}/{t}.npz" if SYNTHETIC else f"{DATA}/{t}" for t in tasks]


def image_cache(task, split):
    return f"{DATA}/{task}/{split}"


def task_vectors(tasks):
    return [f"{STORE}/{t}" for t in tasks]


def merge_settings(method):
    """The method's settings from config `merging` as JSON (methods the schema gives no
    section have none)."""
    return json.dumps(
        config["merging"][method] if method in config["merging"] else {}, sort_keys=True
    )


# Test-time methods (workflow/rules/test_time.smk): their job keys beside the settings.
TEST_TIME_JOB_KEYS = ("enabled", "max_images", "gpus")


def merged_model(method):
    """The merged model file of a single-merge registry method in this workflow."""
    if method not in MERGED_MODELS:
        raise ValueError(
            f"config: merging.surgery.base {method!r} has no merged model in this workflow; choose one of "
            f"{list(MERGED_MODELS)}"
        )
    return MERGED_MODELS[method]


def test_time_settings(method):
    cfg = config["merging"][method]
    return json.dumps(
        {k: v for k, v in cfg.items() if k not in TEST_TIME_JOB_KEYS}, sort_keys=True
    )


def eval_files():
    return (
        [f"{RESULTS}/eval/zeroshot.parquet"]
        + [f"{RESULTS}/eval/individual/{t}.parquet" for t in ALL_TASKS]
        + [f"{RESULTS}/eval/{m}.parquet" for m in MERGE_METHODS]
        + [f"{RESULTS}/eval/task_negation/{t}.parquet" for t in NEGATED]
        + [f"{RESULTS}/eval/adamerging_{v}.parquet" for v in ADAMERGING_VARIANTS]
        + [f"{RESULTS}/eval/{m}.parquet" for m in TEST_TIME_METHODS]
    )


def final_outputs():
    return [f"{RESULTS}/report/report.html", f"{RESULTS}/report/report.md"]


# Analyses (workflow/rules/analysis.smk): config `analysis`, every section enabled by default.
ANALYSIS = config["analysis"]
AN = f"{RESULTS}/analysis"


def analysis_cfg(name):
    return ANALYSIS[name]


def analysis_on(name):
    return analysis_cfg(name)["enabled"]


def sensitivity_methods():
    """analysis.sensitivity.methods (null: every searched method), each a searched method."""
    listed = analysis_cfg("sensitivity")["methods"]
    if listed is None:
        return SEARCH_METHODS
    unknown = [m for m in listed if m not in SEARCH_METHODS]
    if unknown or not listed:
        raise ValueError(
            f"analysis.sensitivity.methods: {unknown or listed} must be a non-empty list of methods "
            f"whose lambda is searched {SEARCH_METHODS} (or null for all of them)"
        )
    return list(listed)


def adamerging_method_settings():
    """merging.adamerging without the job keys: AdaMerging's Settings fields."""
    return {k: v for k, v in ADAMERGING.items() if k not in ADAMERGING_JOB_KEYS}


def adamerging_settings(section):
    """merging.adamerging without the job keys, updated by the analysis section's own."""
    return json.dumps(
        adamerging_method_settings() | analysis_cfg(section)["adamerging"],
        sort_keys=True,
    )


def analysis_max_images(section):
    """The analysis' own max_images, else merging.adamerging's."""
    cfg = analysis_cfg(section)
    return cfg["max_images"] if "max_images" in cfg else ADAMERGING["max_images"]


def merge_lambdas(section):
    lam = analysis_cfg(section)["lam"]
    return json.dumps({"task_arithmetic": lam, "ties_merging": lam})


def analysis_files():
    """name -> path of every analysis output the report shows."""
    out = {}
    if analysis_on("sensitivity"):
        out |= {
            "sensitivity": f"{AN}/sensitivity.parquet",
            "sensitivity_png": f"{AN}/sensitivity.png",
        }
    if analysis_on("coefficients"):
        out |= {
            "coefficients": f"{AN}/coefficients.parquet",
            "coefficients_layer_png": f"{AN}/coefficients_layer_wise.png",
            "coefficients_task_png": f"{AN}/coefficients_task_wise.png",
            "entropy_png": f"{AN}/entropy_curves.png",
        }
    if analysis_on("distances"):
        out |= {
            "distances": f"{AN}/distances.parquet",
            "distances_png": f"{AN}/distances.png",
            "cosine": f"{AN}/cosine.parquet",
            "cosine_png": f"{AN}/cosine.png",
        }
    if analysis_on("surrogate"):
        out |= {
            "spearman": f"{AN}/entropy_spearman.parquet",
            "surrogate_png": f"{AN}/entropy_loss.png",
        }
    if analysis_on("pem") and SOURCE == "synthetic":
        out |= {"pem": f"{AN}/pem.parquet", "pem_png": f"{AN}/pem.png"}
    if analysis_on("robustness"):
        out |= {
            "robustness": f"{AN}/robustness.parquet",
            "robustness_png": f"{AN}/robustness.png",
        }
    for m in TEST_TIME_METHODS:  # workflow/rules/test_time.smk
        out[f"{m}_summary"] = f"{RESULTS}/test_time/{m}/summary.json"
    if "wemoe" in TEST_TIME_METHODS:
        out |= {
            "wemoe_routing": f"{RESULTS}/test_time/wemoe/routing.parquet",
            "wemoe_routing_png": f"{RESULTS}/test_time/wemoe/routing.png",
        }
    if analysis_on("unseen") and SEEN_TASKS:
        out |= {"unseen": f"{AN}/unseen.parquet", "unseen_png": f"{AN}/unseen.png"}
    return out


def pem_main_files():
    """The main table's evaluations the PEM analysis takes its full fine-tuning rows from,
    when the main table ran the same compositions (task negation on, lambda searched, task-wise
    AdaMerging with the PEM section's settings and images); else {} and it recomputes them.
    """
    same_adamerging = (
        json.loads(adamerging_settings("pem")) == adamerging_method_settings()
        and analysis_max_images("pem") == ADAMERGING["max_images"]
    )
    if not (
        NEGATED
        and not FIXED_LAMBDA
        and "task_wise" in ADAMERGING_VARIANTS
        and same_adamerging
    ):
        return {}
    return {
        "main_individual": [f"{RESULTS}/eval/individual/{t}.parquet" for t in TASKS],
        "main_addition": f"{RESULTS}/eval/task_arithmetic.parquet",
        "main_addition_model": merged_model("task_arithmetic").replace(
            "model.safetensors", "model.json"
        ),
        "main_negation": [f"{RESULTS}/eval/task_negation/{t}.parquet" for t in TASKS],
        "main_adamerging": f"{RESULTS}/eval/adamerging_task_wise.parquet",
    }


def option_args(options):
    """Command-line options from {name: file or files}: --name-with-dashes file..."""
    args = []
    for name, files in options.items():
        args.append(f"--{name.replace('_', '-')}")
        args.extend(files if isinstance(files, list) else [files])
    return args


def report_runs():
    """What the report's tables ran AdaMerging with (steps, batches, test images per task:
    0 all), and the analyses their Task Arithmetic and TIES (lam) and robustness its variant,
    as JSON: the report names the rows that differ from the main table's."""

    def adamerging(settings, images):
        keys = ("steps", "batches_per_task", "batch_size")
        return {k: settings[k] for k in keys} | {"images": images}

    runs = {"main": adamerging(ADAMERGING, ADAMERGING["max_images"])}
    for section in ("robustness", "unseen", "pem"):
        settings = json.loads(adamerging_settings(section))
        runs[section] = adamerging(settings, analysis_max_images(section))
        if "lam" in analysis_cfg(section):
            runs[section]["lam"] = analysis_cfg(section)["lam"]
    runs["robustness"]["variant"] = analysis_cfg("robustness")["variant"]
    return json.dumps(runs, sort_keys=True)
