"""Config validation: bad keys or values fail before any job runs, naming the key."""

import re
from pathlib import Path

import pytest
import yaml
from helpers.config import SCHEMA, load, set_key
from helpers.workflow import REPO, snakemake
from snakemake.exceptions import WorkflowError
from snakemake.utils import validate


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "config").glob("*.yaml")))
def test_shipped_configs_validate(name):
    cfg = load(name)
    validate(cfg, SCHEMA)
    assert cfg["zoo"]["trust_pickles"] is False


@pytest.mark.parametrize(
    "mutate, needle",
    [
        (lambda c: c["zoo"].update(taskz=["x"]), "taskz"),
        (lambda c: c["zoo"]["synthetic"]["finetune"].update(lr=-1), "lr"),
        (lambda c: c["zoo"].update(source="hub"), "hub"),
        (lambda c: c["zoo"].pop("synthetic"), "synthetic"),
        (lambda c: c["zoo"].update(tasks=[]), "tasks"),
    ],
)
def test_bad_config_names_the_key(mutate, needle):
    cfg = load("micro.yaml")
    mutate(cfg)
    with pytest.raises(WorkflowError) as err:
        validate(cfg, SCHEMA)
    assert needle in str(err.value)


def test_bad_config_fails_the_dry_run_before_any_job(tmp_path: Path):
    cfg = load("micro.yaml")
    cfg["zoo"]["synthetic"]["pretrain"]["stepz"] = 3
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(cfg))
    proc = snakemake("-n", "--configfile", "bad.yaml", cwd=tmp_path, check=False)
    assert proc.returncode != 0
    assert "stepz" in proc.stderr + proc.stdout
    assert not (tmp_path / "resources").exists()


def test_heldout_task_overlap_is_refused(tmp_path: Path):
    cfg = load("micro.yaml")
    cfg["zoo"]["heldout_tasks"] = [cfg["zoo"]["tasks"][0]]
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(cfg))
    proc = snakemake("-n", "--configfile", "bad.yaml", cwd=tmp_path, check=False)
    assert proc.returncode != 0
    assert "heldout_tasks" in proc.stderr + proc.stdout


def test_a_surgery_base_without_a_merged_model_is_refused(tmp_path: Path):
    cfg = load("micro.yaml")
    cfg["merging"]["surgery"] = {"base": "wemoe"}
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(cfg))
    proc = snakemake("-n", "--configfile", "bad.yaml", cwd=tmp_path, check=False)
    assert proc.returncode != 0
    assert "merging.surgery.base 'wemoe' has no merged model in this workflow" in proc.stderr + proc.stdout


def test_schema_lists_match_their_one_source():
    """The schema's enums of AdaMerging variants and corruptions are the registry's and the
    corruption module's (JSON Schema cannot import them; this keeps the copies equal)."""
    from pipeline.analysis.corruptions import CORRUPTIONS
    from pipeline.merging import registry

    analysis = yaml.safe_load(Path(SCHEMA).read_text())["properties"]["analysis"]["properties"]
    variants = registry.adamerging_variants()
    assert analysis["robustness"]["properties"]["variant"]["enum"] == variants
    assert analysis["unseen"]["properties"]["variants"]["items"]["enum"] == variants
    assert analysis["unseen"]["properties"]["variants"]["default"] == variants
    assert analysis["robustness"]["properties"]["corruptions"]["items"]["enum"] == list(CORRUPTIONS)
    assert analysis["robustness"]["properties"]["corruptions"]["default"] == list(CORRUPTIONS)
    from pipeline.data.synthetic import ATTRIBUTES
    from pipeline.merging.adamerging import PRECISIONS
    from pipeline.models.clip import SYNTHETIC_ARCH

    schema = yaml.safe_load(Path(SCHEMA).read_text())
    assert schema["$defs"]["synthetic_task"]["enum"] == list(ATTRIBUTES)
    synthetic = schema["properties"]["zoo"]["allOf"][0]
    assert synthetic["if"]["properties"]["source"]["const"] == "synthetic"
    assert synthetic["then"]["properties"]["arch"]["const"] == SYNTHETIC_ARCH

    precision = yaml.safe_load(Path(SCHEMA).read_text())["$defs"]["adamerging"]["properties"]["precision"]
    assert precision["enum"] == list(PRECISIONS)


def test_schema_defaults_are_the_settings_defaults():
    """Every default of a method's config section equals its settings dataclass default."""
    import dataclasses

    from pipeline.merging import registry

    merging = yaml.safe_load(Path(SCHEMA).read_text())["properties"]["merging"]["properties"]
    job_keys = {"enabled", "max_images", "gpus"}  # workflow settings, not the method's
    for name, section in merging.items():
        spec = registry.METHODS.get("adamerging_layer_wise" if name == "adamerging" else name)
        if spec is None or "properties" not in section:
            continue
        fields = {f.name: f.default for f in dataclasses.fields(spec.settings)}
        for key, prop in section["properties"].items():
            if key in job_keys:
                continue
            assert key in fields, f"merging.{name}.{key} is not a setting of {spec.name}"
            default = prop["default"]
            assert (tuple(default) if isinstance(default, list) else default) == fields[key], f"merging.{name}.{key}"


HOSTILE = ["x||touch INJECTED||x", "$(touch INJECTED)", "a b", "a;b", "`id`", "-rf", "--help", "../up", "a/b", ""]


@pytest.mark.parametrize("where", ["zoo.tasks", "zoo.heldout_tasks", "analysis.unseen.tasks",
                                   "analysis.robustness.tasks"])
@pytest.mark.parametrize("name", HOSTILE)
def test_task_names_that_could_reach_a_shell_are_refused(where, name):
    """Every task name is a plain name (it names files and reaches command lines): before,
    `analysis.unseen.tasks: ["x||touch INJECTED||x"]` passed the schema and ran `touch`."""
    cfg = load("micro.yaml")
    section, _, key = where.rpartition(".")
    node = cfg
    for part in section.split("."):
        node = node.setdefault(part, {})
    node[key] = [name]
    with pytest.raises(WorkflowError) as err:
        validate(cfg, SCHEMA)
    assert f"[{key!r}][0]" in str(err.value) and section.split(".")[-1] in str(err.value)


@pytest.mark.parametrize("name", ["..", ".", ".hidden", "a/b", "../../etc", "a b", "x;y", ""])
def test_zoo_names_stay_inside_results(name):
    """zoo.name makes results/{name}, resources/models/{name}: ``..`` wrote outside results/."""
    cfg = load("micro.yaml")
    cfg["zoo"]["name"] = name
    with pytest.raises(WorkflowError) as err:
        validate(cfg, SCHEMA)
    assert "['zoo']['name']" in str(err.value)


@pytest.mark.parametrize("revision", ["main; touch X", "$(id)", "-x", "../../x", "a b", ""])
def test_hub_revisions_are_plain_names(revision):
    cfg = load("fusionbench_vit_b32.yaml")
    cfg["zoo"]["datasets"]["revisions"] = {"DTD": revision}
    with pytest.raises(WorkflowError) as err:
        validate(cfg, SCHEMA)
    assert "revisions" in str(err.value)
    cfg = load("fusionbench_vit_b32.yaml")
    cfg["zoo"]["datasets"]["revisions"] = {"DTD": "refs/pr/1", "MNIST": "0123abcd" * 5}
    validate(cfg, SCHEMA)


def test_a_hostile_task_name_fails_the_dry_run_before_any_job(tmp_path: Path):
    cfg = load("micro.yaml")
    cfg["analysis"]["unseen"]["tasks"] = ["x||touch INJECTED||x"]
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(cfg))
    proc = snakemake("-n", "--configfile", "bad.yaml", cwd=tmp_path, check=False)
    assert proc.returncode != 0
    assert "['analysis']['unseen']['tasks'][0]" in proc.stdout + proc.stderr
    assert not (tmp_path / "INJECTED").exists() and not (tmp_path / "resources").exists()


def shell_commands() -> dict[str, str]:
    """rule -> its shell command as written in workflow/rules/*.smk (the string literals
    under ``shell:``, joined)."""
    out = {}
    for smk in sorted((REPO / "workflow/rules").glob("*.smk")):
        rule, lines, block = None, [], None
        for line in smk.read_text().splitlines() + [""]:
            if m := re.match(r"\s*rule (\w+):", line):
                rule = m[1]
            if block is not None:
                if line.strip().startswith('"') and len(line) - len(line.lstrip()) > block:
                    lines.append(line.strip().strip('"'))
                    continue
                out[rule], block, lines = "".join(lines), None, []
            if re.match(r"\s*shell:\s*$", line):
                block = len(line) - len(line.lstrip())
    return out


def test_every_value_a_shell_command_formats_is_quoted():
    """Each ``{...}`` of every rule's shell command carries ``:q`` (lists: each item quoted),
    but ``{threads}``, an integer Snakemake sets."""
    commands = shell_commands()
    assert len(commands) >= 25 and "analysis_unseen_run" in commands
    unquoted = {rule: fields for rule, cmd in commands.items()
                if (fields := [f for f in re.findall(r"(?<!\{)\{([^{}]+)\}(?!\})", cmd)
                               if f != "threads" and not f.endswith(":q")])}
    assert not unquoted


def test_paths_with_shell_characters_reach_the_commands_as_one_argument(tmp_path: Path):
    """Local checkpoint and pretrained paths are free-form: they reach the command lines
    quoted, one argument each (shown by a dry run's printed commands)."""
    import shlex

    cfg = load("vit_b32.yaml")
    cfg["zoo"]["tasks"] = ["EuroSAT", "DTD"]
    paths = {"EuroSAT": "ckpt dir/$(touch INJECTED);x.pt", "DTD": "it's `id`.pt"}
    for path in paths.values():
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).touch()
    (tmp_path / "pre trained;x.pt").touch()
    cfg["zoo"]["checkpoints"] = {"paths": paths}
    cfg["zoo"]["pretrained"] = "pre trained;x.pt"
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
    proc = snakemake("-n", "-p", "--configfile", "run.yaml", cwd=tmp_path)
    commands = [shlex.split(line.split(":", 1)[1]) for line in proc.stdout.splitlines()
                if re.match(r"\s*Shell command: adamerge import-", line)]
    assert len(commands) == 3
    given = {argv[argv.index(flag) + 1] for argv in commands for flag in ("--checkpoint", "--source") if flag in argv}
    assert given == {*paths.values(), "pre trained;x.pt"}
    assert not (tmp_path / "INJECTED").exists()


def schema_nodes(node, where="#"):
    """(JSON pointer, subschema) of every schema node under ``node``."""
    if isinstance(node, dict):
        yield where, node
        for key, value in node.items():
            if key in ("properties", "$defs"):
                for name, sub in value.items():
                    yield from schema_nodes(sub, f"{where}/{key}/{name}")
            elif key in ("items", "additionalProperties", "propertyNames", "then", "else"):  # an `if`: a test
                yield from schema_nodes(value, f"{where}/{key}")
            elif key in ("oneOf", "anyOf", "allOf"):
                for i, sub in enumerate(value):
                    yield from schema_nodes(sub, f"{where}/{key}/{i}")


def test_every_object_of_the_schema_is_closed():
    """No object takes keys it does not name (a typo like ``stesp: 150`` would be ignored):
    each has ``additionalProperties: false``, is a map with named keys (``propertyNames``),
    or is a $defs fragment closed where it is used (``unevaluatedProperties: false``)."""
    schema = yaml.safe_load(Path(SCHEMA).read_text())
    fragments = {f"#/$defs/{name}" for name, d in schema["$defs"].items()
                 if d.get("type") == "object" and "additionalProperties" not in d}
    open_objects, open_uses = [], []
    for where, node in schema_nodes(schema):
        if node.get("$ref") in fragments and node.get("unevaluatedProperties") is not False:
            open_uses.append(where)
        is_object = node.get("type") == "object" or "properties" in node or "$ref" in node and node["$ref"] in fragments
        if not is_object or where in fragments or where == "#/$defs" or where.endswith(("/then", "/else")):
            continue  # a `then` narrows the (closed) object it sits in
        extra = node.get("additionalProperties")
        closed = (extra is False or node.get("unevaluatedProperties") is False
                  or isinstance(extra, dict) and "propertyNames" in node)
        if not closed:
            open_objects.append(where)
    assert not open_objects and not open_uses
    assert fragments == {"#/$defs/adamerging", "#/$defs/training"}


@pytest.mark.parametrize("section", ["merging.adamerging", "analysis.robustness.adamerging",
                                     "analysis.unseen.adamerging", "analysis.pem.adamerging",
                                     "analysis.pem.lora", "zoo.synthetic.pretrain", "zoo.synthetic.finetune",
                                     "analysis.surrogate", "zoo.images"])
def test_a_typo_anywhere_is_refused_naming_it(section):
    cfg = load("micro.yaml")
    node = cfg
    for part in section.split("."):
        node = node.setdefault(part, {})
    node["stesp"] = 150
    with pytest.raises(WorkflowError) as err:
        validate(cfg, SCHEMA)
    assert "'stesp' was unexpected" in str(err.value)
    assert "".join(f"[{p!r}]" for p in section.split(".")) in str(err.value)


def test_overrides_take_the_method_settings_and_stay_partial():
    """analysis.*.adamerging take the keys of AdaMerging's settings (the one $defs fragment
    merging.adamerging also uses), not the workflow's job keys; validate fills no defaults
    into them. zoo.synthetic's schedules and analysis.pem.lora share the training fragment,
    whose keys are the multi-task settings (the joint training gets zoo.synthetic.finetune)."""
    import dataclasses

    from pipeline.merging import registry

    schema = yaml.safe_load(Path(SCHEMA).read_text())
    settings = [f.name for f in dataclasses.fields(registry.method("adamerging_task_wise").settings)]
    assert list(schema["$defs"]["adamerging"]["properties"]) == settings
    merging = schema["properties"]["merging"]["properties"]["adamerging"]["properties"]
    assert list(merging) == settings + ["max_images", "gpus"]
    training = [f.name for f in dataclasses.fields(registry.method("multitask").settings)]
    assert list(schema["$defs"]["training"]["properties"]) == training

    cfg = load("micro.yaml")
    cfg["analysis"]["unseen"]["adamerging"] = {"lr": 0.01}
    validate(cfg, SCHEMA)
    assert cfg["analysis"]["unseen"]["adamerging"] == {"lr": 0.01}
    assert cfg["analysis"]["robustness"]["adamerging"] == {"steps": 20}
    assert cfg["analysis"]["pem"]["lora"] == {"steps": 60, "lr": 2.0e-3, "rank": 4, "alpha": 8.0}
    for name in ("robustness", "unseen", "pem"):
        cfg = load("micro.yaml")
        cfg["analysis"][name]["adamerging"] = {"gpus": 2}
        with pytest.raises(WorkflowError, match="'gpus' was unexpected"):
            validate(cfg, SCHEMA)


def schema_branches(schema: dict, node: dict) -> list[dict]:
    """``node`` and what it composes ($ref, oneOf, anyOf, allOf), recursively."""
    out = [node]
    if "$ref" in node:
        target = schema
        for part in node["$ref"].removeprefix("#/").split("/"):
            target = target[part]
        out += schema_branches(schema, target)
    for key in ("oneOf", "anyOf", "allOf"):
        for sub in node.get(key, []):
            out += schema_branches(schema, sub)
    return out


def schema_at(schema: dict, dotted: str) -> list[dict]:
    """The subschemas of config key ``dotted`` (``merging.adamerging.precision``); [] when the
    schema has no such key."""
    nodes = [schema]
    for part in dotted.split("."):
        nodes = [b["properties"][part] for n in nodes for b in schema_branches(schema, n)
                 if part in b.get("properties", {})]
    return [b for n in nodes for b in schema_branches(schema, n)]


DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
NOT_CONFIG = {"merging.scaled_average"}  # docs/architecture.md: a method one would add, with its section


def test_every_documented_config_key_is_accepted():
    """Keys the README and docs/ name (``merging.adamerging.precision: bf16``, the methods
    table's ``k: 20``, the Hub section's ``revision:`` ...) are in the schema, with the
    documented value accepted and the documented default the schema's."""
    schema = yaml.safe_load(Path(SCHEMA).read_text())
    cfg = load("fusionbench_vit_b32.yaml")
    seen = 0
    for doc in DOCS:
        text = doc.read_text()
        for m in re.finditer(r"`((?:zoo|merging|analysis|evaluation)(?:\.\w+)+)(?:: ([^`]*))?`", text):
            key, value = m[1], m[2]
            if key in NOT_CONFIG or key.endswith(".smk"):
                continue
            assert schema_at(schema, key), f"{doc.name}: `{key}` is not a config key"
            seen += 1
            if value and value.startswith("{"):  # `merging.storage: {dtype, codec, level}`
                for sub in value.strip("{}").split(","):
                    assert schema_at(schema, f"{key}.{sub.strip()}"), f"{doc.name}: {key}.{sub.strip()}"
            elif value:
                *parents, leaf = key.split(".")
                node = cfg
                for part in parents:
                    node = node.setdefault(part, {})
                node[leaf] = yaml.safe_load(value)
    validate(cfg, SCHEMA)  # the documented values, together
    assert cfg["merging"]["adamerging"]["precision"] == "bf16"

    readme = (REPO / "README.md").read_text()
    table = readme[readme.index("| method | settings"):readme.index("The lambda grid results")]
    for method, settings in re.findall(r"^\| `(\w+)` \| (.*) \|$", table, re.MULTILINE):
        for key, value in re.findall(r"`(\w+): ([^`]+)`", settings):
            prop = schema_at(schema, f"merging.{method}.{key}")
            assert prop, f"README: merging.{method}.{key} is not a config key"
            assert prop[0]["default"] == yaml.safe_load(value.replace("1e-6", "1.0e-6")), f"README: {method}.{key}"
            seen += 1
    hub = readme[readme.index("## Reproduce the paper"):readme.index("## Configurations")]
    zoo_keys = list(schema["properties"]["zoo"]["properties"])
    for key in re.findall(r"`(\w+):`", hub):  # `revision:` is a key of zoo.pretrained, zoo.datasets, ...
        assert any(schema_at(schema, k) for k in [f"zoo.{key}"] + [f"zoo.{z}.{key}" for z in zoo_keys]), \
            f"README: {key} is no key of zoo"
        seen += 1
    assert seen >= 20


@pytest.mark.parametrize("key, value, needle", [
    ("merging.adamerging.betas", [2, 3], "On instance['merging']['adamerging']['betas'][0]"),
    ("merging.adamerging.betas", [0.9, 1.0], "On instance['merging']['adamerging']['betas'][1]"),
    ("merging.chunk_mib", 1e-9, "On instance['merging']['chunk_mib']"),
    ("zoo.seed", 2**40, "On instance['zoo']['seed']"),
    ("analysis.robustness.corruptions", [], "On instance['analysis']['robustness']['corruptions']"),
    ("analysis.unseen.variants", [], "On instance['analysis']['unseen']['variants']"),
    ("zoo.tasks", ["colour", "nope"], "On instance['zoo']['tasks'][1]"),  # no synthetic task
    ("zoo.arch", "ViT-B-32", "On instance['zoo']['arch']"),  # the synthetic zoo has one architecture
])
def test_ranges_the_schema_says_are_refused_naming_the_key(key, value, needle):
    """(The rules JSON Schema cannot say: tests/pipeline/test_config_checks.py.)"""
    with pytest.raises(WorkflowError) as err:
        validate(set_key(load("micro.yaml"), key, value), SCHEMA)
    assert needle in str(err.value)


def test_cross_field_problems_fail_the_dry_run_before_any_job(tmp_path: Path):
    cfg = load("micro.yaml")
    cfg["merging"]["lambda_grid"] = {"start": 1.0, "stop": 0.0}
    cfg["merging"]["adamerging"]["clamp"] = [1, 0]
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(cfg))
    proc = snakemake("-n", "--configfile", "bad.yaml", cwd=tmp_path, check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "config: 2 problem(s)" in out
    assert "merging.lambda_grid: start 1.0 is above stop 0.0" in out and "merging.adamerging.clamp" in out
    assert not (tmp_path / "resources").exists()
