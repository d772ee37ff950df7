"""The package layering, checked by parsing (not importing) every module under pipeline/ and
kernels/: no module imports a layer above its own or a sibling of its level."""

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Bottom to top. A module may import its own layer and the layers of lower levels, nothing of
# its level's other layers nor above: kernels | io | provenance | config_checks | functional |
# job_server | job_usage | the package's __init__ < models | hub < data | store < zoo | evaluation < merging < analysis < report <
# commands < cli < __main__ (data and store are independent of each other, so are zoo and
# evaluation; docs/architecture.md shows the same table).
LEVELS = [
    ("kernels", "pipeline.io", "pipeline.provenance", "pipeline.config_checks", "pipeline.functional",
     "pipeline.job_server", "pipeline.job_usage", "pipeline"),
    ("pipeline.models", "pipeline.hub"),
    ("pipeline.data", "pipeline.store"),
    ("pipeline.zoo", "pipeline.evaluation"),
    ("pipeline.merging",),
    ("pipeline.analysis",),
    ("pipeline.report",),
    ("pipeline.commands",),
    ("pipeline.cli",),
    ("pipeline.__main__",),
]
LEVEL = {layer: i for i, layers in enumerate(LEVELS) for layer in layers}
METHOD_NAME = re.compile(r"(?i:(?<![a-z])ties(?![a-z])|weight_averaging|task_arithmetic|task_negation|fisher|regmean"
                         r"|adamerging|(?<![a-z])dare(?![a-z])|consensus|tall_mask|(?<![a-z])emr(?![a-z]))"
                         r"|Ties")  # not "properties"


def layer_of(module: str) -> str | None:
    """The most specific layer that ``module`` belongs to (None: not ours, e.g. torch, or a
    module of pipeline/ that no layer holds; the layer "pipeline" is its __init__ alone)."""
    parts = module.split(".")
    for n in range(len(parts), 1, -1):
        if ".".join(parts[:n]) in LEVEL:
            return ".".join(parts[:n])
    return parts[0] if parts[0] in LEVEL and (len(parts) == 1 or parts[0] == "kernels") else None


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, source: str) -> list[tuple[int, str]]:
    """(line, module) of every import in ``source`` (the text of ``path``), at any depth
    (functions, TYPE_CHECKING blocks), relative ones resolved, ``from a import b`` as ``a.b``,
    and of ``importlib.import_module("pipeline.x...")`` calls (up to the last dot of their
    literal part)."""
    tree = ast.parse(source, str(path))
    package = module_name(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(package[: len(package) - node.level + 1] + ([node.module] if node.module else [])) \
                if node.level else node.module
            found += [(node.lineno, f"{base}.{alias.name}") for alias in node.names]
        elif (isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None)) == "import_module"
              and node.args):
            arg = node.args[0]
            text = arg.value if isinstance(arg, ast.Constant) else \
                arg.values[0].value if isinstance(arg, ast.JoinedStr) and isinstance(arg.values[0], ast.Constant) else ""
            if isinstance(text, str) and text:
                found.append((node.lineno, text if isinstance(arg, ast.Constant) else text.rsplit(".", 1)[0]))
    return found


def modules() -> list[Path]:
    return sorted(p for d in ("pipeline", "kernels") for p in (ROOT / d).rglob("*.py"))


def violations(path: Path, extra: str = "") -> list[str]:
    """The imports of ``path`` (plus the source ``extra`` appended to it) that break the layering."""
    own = layer_of(module_name(path))
    assert own is not None, f"{path.relative_to(ROOT)} belongs to no layer: add its package to LEVELS"
    bad = []
    for line, target in imports(path, path.read_text() + extra):
        other = layer_of(target)
        if other is None or other == own:
            continue
        if LEVEL[other] >= LEVEL[own]:
            bad.append(f"{path.relative_to(ROOT)}:{line} ({own}, level {LEVEL[own]}) imports {target} "
                       f"({other}, level {LEVEL[other]})")
    return bad


def test_every_module_respects_the_layering():
    assert len(modules()) > 40
    bad = [v for path in modules() for v in violations(path)]
    assert not bad, "upward or sideways imports:\n" + "\n".join(bad)


@pytest.mark.parametrize("module, added", [
    ("kernels/ties_merge.py", "from pipeline.io import atomic_path\n"),
    ("pipeline/store/streaming.py", "def f():\n    from pipeline.merging.ties_merging import Ties\n"),
    ("pipeline/store/task_vectors.py", "from pipeline.data.tasks import load_split\n"),
    ("pipeline/data/tasks.py", "from pipeline.zoo.synthetic_zoo import build_task_data\n"),
    ("pipeline/models/checkpoints.py", "import pipeline.store.task_vectors\n"),
    ("pipeline/merging/ties_merging.py", "import importlib\nimportlib.import_module(f'pipeline.analysis.{x}')\n"),
    ("pipeline/io.py", "from . import functional\n"),
    ("pipeline/data/synthetic.py", "from ..store import streaming\n"),
    ("pipeline/__init__.py", "from pipeline.cli import main\n"),
])
def test_an_upward_import_is_caught(module, added):
    path = ROOT / module
    assert not violations(path)
    assert violations(path, "\n" + added)


def test_the_store_knows_no_method():
    """No identifier of pipeline/store names a merging method (docstrings and comments may)."""
    names = []
    for path in sorted((ROOT / "pipeline" / "store").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            for name in (getattr(node, "id", None), getattr(node, "attr", None), getattr(node, "name", None),
                         getattr(node, "arg", None), getattr(node, "module", None)):
                if isinstance(name, str) and METHOD_NAME.search(name):
                    names.append(f"{path.relative_to(ROOT)}:{node.lineno} {name}")
    assert not names, names
