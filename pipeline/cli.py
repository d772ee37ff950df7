"""Command line of the pipeline: ``python -m pipeline VERB --option value ...``.

Each verb is one function of a module in :mod:`pipeline.commands` (the adapter layer that
loads files, calls the library and writes results); its options are built from the
function's typed signature, so an argument is defined once, in that signature:

    str       -> --name VALUE          int, float -> --name NUMBER
    bool      -> --name (a flag)       dict       -> --name JSON
    list[X]   -> --name V1 V2 ...      (optional when the parameter has a default)

Every verb also takes ``--threads`` (torch's intra-op threads). Only the module of the verb
that runs is imported. ``job-server --address SOCKET --parent-pid PID`` is the workflow's
own: the warm process that runs local jobs (:mod:`pipeline.job_server`).
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import logging
import os
import sys
import typing
from collections.abc import Callable

from pipeline import job_usage

# verb -> module of pipeline.commands that defines it (function: the verb with "_" for "-")
COMMANDS = {
    "task-data": "synthetic",
    "pretrain": "synthetic",
    "finetune": "synthetic",
    "lora-finetune": "synthetic",
    "download-model": "download",
    "download-dataset": "download",
    "import-pretrained": "zoo",
    "import-finetuned": "zoo",
    "head": "zoo",
    "decode-images": "images",
    "task-vector": "task_vectors",
    "merge": "merge",
    "lambda-search": "lambda_search",
    "adamerge": "adamerging",
    "adapt": "test_time",
    "evaluate": "evaluate",
    "report": "report",
    "analysis-sensitivity-test": "analysis_sensitivity",
    "analysis-sensitivity": "analysis_sensitivity",
    "analysis-coefficients": "analysis_coefficients",
    "analysis-distances": "analysis_distances",
    "analysis-surrogate": "analysis_surrogate",
    "analysis-robustness": "analysis_robustness",
    "analysis-robustness-table": "analysis_robustness",
    "analysis-unseen": "analysis_unseen",
    "analysis-unseen-table": "analysis_unseen",
    "analysis-pem-lora": "analysis_pem",
    "analysis-pem": "analysis_pem",
}


def command_module(verb: str) -> str:
    """The dotted module that defines ``verb``."""
    if verb not in COMMANDS:
        raise ValueError(f"unknown verb {verb!r}; known: {sorted(COMMANDS)}")
    return f"pipeline.commands.{COMMANDS[verb]}"


def command(verb: str) -> Callable:
    """The function of ``verb`` (imports its module)."""
    return getattr(importlib.import_module(command_module(verb)), verb.replace("-", "_"))


def _option(parser: argparse.ArgumentParser, param: inspect.Parameter, hint) -> None:
    flag = "--" + param.name.replace("_", "-")
    required = param.default is inspect.Parameter.empty
    kw: dict = {"required": required} if required else {"default": param.default}
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Union or str(origin) == "<class 'types.UnionType'>":  # X | None
        hint = next(a for a in args if a is not type(None))
        origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is bool:
        parser.add_argument(flag, action="store_true")
        return
    if origin in (list, tuple):
        kw |= {"nargs": "+" if required else "*", "type": args[0] if args and args[0] in (int, float) else str}
        if not required:
            kw["default"] = list(param.default)
    elif hint is dict or origin is dict:
        kw["type"] = json.loads
    elif hint in (int, float):
        kw["type"] = hint
    parser.add_argument(flag, **kw)


def add_verb(sub: argparse._SubParsersAction, verb: str) -> None:
    """A subparser for ``verb`` built from its function's signature and docstring."""
    fn = command(verb)
    doc = inspect.getdoc(fn) or ""
    parser = sub.add_parser(verb, help=" ".join(doc.split("\n\n")[0].split()), description=doc)
    hints = typing.get_type_hints(fn)
    for param in inspect.signature(fn).parameters.values():
        _option(parser, param, hints.get(param.name, str))
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "2")),
                        help="torch intra-op threads")
    parser.set_defaults(_fn=fn)


def build_parser(verbs: list[str] | None = None) -> argparse.ArgumentParser:
    """The parser of ``verbs`` (all of them when None)."""
    p = argparse.ArgumentParser(prog="python -m pipeline", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="verb", required=True)
    for verb in verbs or COMMANDS:
        add_verb(sub, verb)
    return p


def main(argv: list[str] | None = None) -> None:
    """``adamerge VERB ...``: in the workflow's job server when one is running
    (:mod:`pipeline.job_server`), else in this process."""
    argv = sys.argv[1:] if argv is None else list(argv)
    # open_clip imports these whenever they are installed (Hugging Face text towers, timm
    # vision towers: about 1.5 s of every job's start-up), and the supported architectures
    # use neither. PIPELINE_IMPORT_TRANSFORMERS=1 keeps the imports for one that does.
    if os.environ.get("PIPELINE_IMPORT_TRANSFORMERS") != "1":
        for name in ("transformers", "timm"):
            sys.modules.setdefault(name, None)
    from pipeline import job_server

    if argv[:1] == ["job-server"]:
        serve_jobs(argv[1:])
        return
    code = job_server.delegate(argv)
    if code is not None:
        sys.exit(code)
    run(argv)


def serve_jobs(argv: list[str]) -> None:
    """``job-server --address SOCKET --parent-pid PID``: import every verb's module, then run
    the jobs sent to ``SOCKET`` with :func:`run` until process ``PID`` exits."""
    from pipeline import job_server

    p = argparse.ArgumentParser(prog="python -m pipeline job-server", description=serve_jobs.__doc__)
    p.add_argument("--address", required=True, help="the Unix socket to listen on")
    p.add_argument("--parent-pid", type=int, required=True, help="serve until this process exits")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    modules = (*job_server.PRELOAD, *(f"pipeline.commands.{m}" for m in sorted(set(COMMANDS.values()))))
    job_server.serve(args.address, args.parent_pid, run, modules)


def run(argv: list[str]) -> None:
    """Parse ``argv`` and run its verb here; its CPU time and peak memory go to the log."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    args = vars(build_parser([argv[0]] if argv and argv[0] in COMMANDS else None).parse_args(argv))
    import torch

    torch.set_num_threads(max(1, args.pop("threads")))
    fn = args.pop("_fn")
    args.pop("verb")
    try:
        fn(**args)
    finally:
        job_usage.log_usage()
