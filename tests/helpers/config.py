"""Helpers of the config tests: the shipped configs, and the workflow's verdict on a config
(the schema, then pipeline/config_checks.py, as workflow/rules/common.smk applies them)."""

from __future__ import annotations

import yaml
from snakemake.exceptions import WorkflowError
from snakemake.utils import validate

from helpers.workflow import REPO
from pipeline import config_checks

SCHEMA = str(REPO / "workflow/schemas/config.schema.yaml")


def load(name: str) -> dict:
    """config/{name} as a dict."""
    return yaml.safe_load((REPO / "config" / name).read_text())


def refusal(cfg: dict) -> str | None:
    """Why the workflow refuses ``cfg`` (the schema's error, else the cross-field problems),
    None when it passes; ``cfg`` gets the schema's defaults."""
    try:
        validate(cfg, SCHEMA)
    except WorkflowError as err:
        return str(err)
    return "\n".join(config_checks.problems(cfg)) or None


def set_key(cfg: dict, dotted: str, value) -> dict:
    """``cfg`` with ``value`` at ``dotted`` (``merging.adamerging.clamp``), parents created."""
    *parents, leaf = dotted.split(".")
    node = cfg
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = value
    return cfg
