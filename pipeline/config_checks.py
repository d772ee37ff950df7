"""Rules of the workflow config that JSON Schema cannot say: orders between keys, sizes that
follow from several keys, numbers the jobs cannot compute with, names that must refer to
tasks of the zoo.

The Snakefile calls :func:`check` right after validating the config against
``workflow/schemas/config.schema.yaml`` (so the schema's defaults are filled in and every
value has its type), before any job is planned: a config either passes both or fails naming
each key at fault and its fix. Each rule mirrors what a job would do with the value (the
module it cites), so a config that passes is one the jobs accept.

Imports only the standard library, PyYAML and jsonschema (what Snakemake itself imports):
no torch, so that parsing the workflow stays fast.
"""

from __future__ import annotations

import math
import string
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

SCHEMA = Path(__file__).resolve().parents[1] / "workflow/schemas/config.schema.yaml"

MAX_GRID_POINTS = 1000  # lambdas a search evaluates on the validation split (each a merge + evaluation)
FLOAT32_MAX = 3.4028234663852886e38  # the jobs compute in float32: a larger number becomes inf
INT_MAX = 2**31 - 1  # sizes, steps and seeds (torch and numpy take them as 32/64-bit integers)
BLOSC_MAX_LEVEL = 9  # c-blosc's clevel range is 0..9 (zstd's, 0..22, is the schema's maximum)
STORE_ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2}  # pipeline/store/task_vectors.py DTYPES
ADAMERGING_JOB_KEYS = ("max_images", "gpus")  # workflow keys of merging.adamerging, not Settings fields
ADAMERGING_ANALYSES = ("robustness", "unseen", "pem")  # sections with analysis.<name>.adamerging overrides
PATTERN_FIELDS = {"task", "hub_name"}  # what workflow/rules/common.smk fill() puts into a pattern


class ConfigError(ValueError):
    """A config the workflow refuses; the message lists each problem with its key."""


def check(config: Mapping[str, Any], schema: str | Path = SCHEMA) -> None:
    """Raise :class:`ConfigError` listing every problem of ``config`` (validated against the
    schema, defaults filled in); return quietly when there is none."""
    found = problems(config, schema)
    if found:
        raise ConfigError(f"config: {len(found)} problem(s):\n" + "\n".join(f"  - {p}" for p in found))


def problems(config: Mapping[str, Any], schema: str | Path = SCHEMA) -> list[str]:
    """Every problem of ``config`` as ``"key: what is wrong; the fix"``. Numbers come first:
    the other rules assume finite numbers of their schema types."""
    found = integers_written_as_floats(config, schema) + numbers_out_of_range(config)
    if found:
        return found
    return [
        *lambda_grid(config),
        *adamerging(config),
        *storage(config),
        *synthetic(config),
        *tasks(config),
        *patterns(config),
    ]


# -- numbers ----------------------------------------------------------------------------


def integers_written_as_floats(config: Mapping[str, Any], schema: str | Path) -> list[str]:
    """JSON Schema counts ``100.0`` as an integer; the jobs do not (``range(100.0)``,
    ``--max-images 100.0`` fail). The schema again, with integers that are ints."""
    import jsonschema
    import yaml

    if not isinstance(schema, Mapping):
        schema = yaml.safe_load(Path(schema).read_text())
    base = jsonschema.Draft202012Validator
    ints = base.TYPE_CHECKER.redefine(
        "integer", lambda _, x: isinstance(x, int) and not isinstance(x, bool)
    )
    strict = jsonschema.validators.extend(base, type_checker=ints)(schema)
    out = []
    for err in strict.iter_errors(config):
        key = dotted(err.absolute_path)
        value = err.instance
        if isinstance(value, float) and value.is_integer() and abs(value) <= INT_MAX:
            out.append(f"{key}: {value!r} is no integer; write {int(value)}")
        elif isinstance(value, float) and value.is_integer():
            out.append(f"{key}: {value!r} is no integer; give an integer of at most {INT_MAX}")
        else:
            out.append(f"{key}: {err.message}")
    return sorted(set(out))


def numbers_out_of_range(config: Mapping[str, Any]) -> list[str]:
    """NaN and infinities (YAML's ``.nan``, ``.inf`` pass any ``minimum``), floats beyond
    float32 (the jobs' compute type: they would become inf) and integers beyond 32 bits."""
    out = []
    for key, value in leaves(config):
        if isinstance(value, bool):
            continue
        if isinstance(value, float) and not math.isfinite(value):
            out.append(f"{key}: {value} is not a finite number; give a finite value")
        elif isinstance(value, float) and abs(value) > FLOAT32_MAX:
            out.append(f"{key}: {value:g} is beyond float32 (|x| <= {FLOAT32_MAX:.3g}), the jobs' "
                       f"compute type; give a smaller value")
        elif isinstance(value, int) and abs(value) > INT_MAX:
            out.append(f"{key}: {value} is beyond a 32-bit integer (|x| <= {INT_MAX}); give a smaller value")
    return out


# -- merging ----------------------------------------------------------------------------


def grid_points(start: float, stop: float, step: float) -> float:
    """How many lambdas ``pipeline.merging.lambda_search.grid`` makes (inf when too many to count)."""
    n = (stop - start) / step
    return round(n) + 1 if math.isfinite(n) else math.inf


def lambda_grid(config: Mapping[str, Any]) -> list[str]:
    grid = config["merging"]["lambda_grid"]
    start, stop, step = grid["start"], grid["stop"], grid["step"]
    if start > stop:
        return [f"merging.lambda_grid: start {start} is above stop {stop}; give start <= stop"]
    n = grid_points(start, stop, step)
    if n > MAX_GRID_POINTS:
        least = (stop - start) / (MAX_GRID_POINTS - 1)
        return [(f"merging.lambda_grid.step: {step} makes {n:g} lambdas from {start} to {stop}, more than "
                 f"{MAX_GRID_POINTS} (each a merge and an evaluation); give a step of at least {least:.3g}")]
    return []


def adamerging_settings(config: Mapping[str, Any]) -> Iterator[tuple[str, dict, dict]]:
    """(config key, the settings AdaMerging runs with, the keys the section sets itself) of
    merging.adamerging and of each analysis' overrides (workflow/rules/common.smk
    adamerging_settings)."""
    base = {k: v for k, v in config["merging"]["adamerging"].items() if k not in ADAMERGING_JOB_KEYS}
    yield "merging.adamerging", base, base
    for name in ADAMERGING_ANALYSES:
        own = config["analysis"][name]["adamerging"]
        yield f"analysis.{name}.adamerging", base | own, own


def adamerging(config: Mapping[str, Any]) -> list[str]:
    """``clamp`` is (low, high) with low <= high (``Settings`` refuses it at job time), and
    ``init`` lies within it: outside, the clamped coefficient has no gradient and AdaMerging
    returns the initial lambdas untouched (a silent no-op)."""
    out = []
    for key, settings, own in adamerging_settings(config):
        if not own.keys() & {"clamp", "init"}:
            continue  # what it inherits was checked with merging.adamerging
        (low, high), init = settings["clamp"], settings["init"]
        if low > high and "clamp" not in own:
            continue  # merging.adamerging.clamp, reported there
        if low > high:
            out.append(f"{key}.clamp: {list(settings['clamp'])} is not [low, high]; give low <= high")
        elif not low <= init <= high:
            where = f"{key}.init" if "init" in own else f"{key}.clamp"
            out.append(f"{where}: init {init} lies outside clamp [{low}, {high}], where the coefficients get "
                       f"no gradient and never move; give an init within the clamp")
    return out


def storage(config: Mapping[str, Any]) -> list[str]:
    """The codec's level range, and streaming's memory: the reader holds blocks of one chunk
    of every task vector (read as float32) within half of ``budget_mib``
    (pipeline/store/streaming.py Reader)."""
    merging = config["merging"]
    store, out = merging["storage"], []
    if store["codec"] == "blosc" and store["level"] > BLOSC_MAX_LEVEL:
        out.append(f"merging.storage.level: {store['level']} is beyond blosc's levels 0..{BLOSC_MAX_LEVEL}; "
                   f"give a level of at most {BLOSC_MAX_LEVEL} (or codec zstd, levels up to 22)")
    k = len(config["zoo"].get("tasks", []))
    block = merging["chunk_mib"] * 4 / STORE_ITEMSIZE[store["dtype"]] * k
    if k and block > merging["budget_mib"] / 2:
        out.append(f"merging.budget_mib: {merging['budget_mib']} MiB holds no block of the {k} tasks' "
                   f"{merging['chunk_mib']} MiB chunks ({block:g} MiB as float32, which takes half the budget); "
                   f"raise merging.budget_mib to at least {2 * block:g} or lower merging.chunk_mib")
    return out


# -- zoo --------------------------------------------------------------------------------


def synthetic(config: Mapping[str, Any]) -> list[str]:
    """Pretraining samples its batches without replacement from the corpus
    (pipeline/zoo/synthetic_zoo.py pretrain)."""
    if "synthetic" not in config["zoo"]:
        return []
    pretrain = config["zoo"]["synthetic"]["pretrain"]
    if pretrain["batch_size"] > pretrain["corpus"]:
        return [(f"zoo.synthetic.pretrain.batch_size: {pretrain['batch_size']} is more than the corpus of "
                 f"{pretrain['corpus']} images a batch is drawn from; give batch_size <= corpus")]
    return []


def tasks(config: Mapping[str, Any]) -> list[str]:
    """Held-out tasks are not merged tasks; the analyses' task lists name tasks of the zoo,
    and the unseen-task analysis leaves at least one task merged. (Skipped while zoo.tasks
    is not resolved from zoo.suite.)"""
    zoo = config["zoo"]
    if "tasks" not in zoo:
        return []
    merged, heldout = list(zoo["tasks"]), list(zoo.get("heldout_tasks", []))
    out = []
    overlap = sorted(set(merged) & set(heldout))
    if overlap:
        out.append(f"zoo.heldout_tasks: {overlap} also appear in zoo.tasks; a task is either merged or held out")
    for name in ("robustness", "unseen"):
        listed = config["analysis"][name]["tasks"]
        unknown = [t for t in listed if t not in merged + heldout]
        if unknown:
            out.append(f"analysis.{name}.tasks: {unknown} are no tasks of the zoo; name tasks of zoo.tasks "
                       f"or zoo.heldout_tasks {merged + heldout}")
    unseen = config["analysis"]["unseen"]["tasks"]
    if unseen and not [t for t in merged if t not in unseen]:
        out.append(f"analysis.unseen.tasks: {unseen} leave no task of zoo.tasks to merge; keep at least one "
                   f"merged (or set analysis.unseen.enabled: false)")
    return out


def patterns(config: Mapping[str, Any]) -> list[str]:
    """Checkpoint patterns are filled with ``str.format(task=..., hub_name=...)``: other
    fields (``{foo}``, ``{0}``, ``{task.x}``) fail or read attributes; a pretrained repo is
    one repo, with no fields."""
    zoo, out = config["zoo"], []
    checkpoints = zoo.get("checkpoints")
    pattern = checkpoints if isinstance(checkpoints, str) else (checkpoints or {}).get("repo")
    if pattern is not None:
        key = "zoo.checkpoints" + ("" if isinstance(checkpoints, str) else ".repo")
        bad = format_fields(pattern) - PATTERN_FIELDS
        if bad:
            out.append(f"{key}: {pattern!r} has the fields {sorted(bad)}; use only {{task}} and {{hub_name}}")
    pretrained = zoo.get("pretrained")
    if isinstance(pretrained, Mapping) and format_fields(pretrained["repo"]):
        out.append(f"zoo.pretrained.repo: {pretrained['repo']!r} is a pattern; name one repo")
    return out


def format_fields(pattern: str) -> set[str]:
    """The replacement fields of a ``str.format`` pattern (``{task}`` -> ``task``; a field
    with an attribute, index, conversion or format spec is kept whole: it is refused)."""
    try:
        parsed = list(string.Formatter().parse(pattern))
    except ValueError:  # unbalanced braces
        return {pattern}
    return {
        name + (f"!{conv}" if conv else "") + (f":{spec}" if spec else "")
        for _, name, spec, conv in parsed
        if name is not None
    }


# -- helpers ----------------------------------------------------------------------------


def dotted(path) -> str:
    """``['merging', 'adamerging', 'clamp', 0]`` -> ``merging.adamerging.clamp[0]``."""
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else f".{part}" if out else str(part)
    return out or "(the config)"


def leaves(node: Any, path: tuple = ()) -> Iterator[tuple[str, Any]]:
    """(dotted key, value) of every scalar in ``node``."""
    if isinstance(node, Mapping):
        for key, value in node.items():
            yield from leaves(value, (*path, key))
    elif isinstance(node, list | tuple):
        for i, value in enumerate(node):
            yield from leaves(value, (*path, i))
    else:
        yield dotted(path), node
