"""Code versions of workflow jobs, derived from the imports (standard library only: the
Snakefile imports this at parse time).

A job runs ``python -m pipeline VERB``: the CLI, the verb's command module and everything
they import inside ``pipeline/`` and ``kernels/`` (module-level and function-level imports,
found by walking the source's ``ast``; a package's ``__init__`` counts, as importing a
submodule runs it). The registry imports every method module, but a job runs only the
methods it names: the walk takes the registry's own source (names, labels, needs) and does
not follow its imports; a job that dispatches methods by name adds their modules itself.
"""

from __future__ import annotations

import ast
import functools
import hashlib
from collections.abc import Iterable
from pathlib import Path

PACKAGES = ("pipeline", "kernels")
# module -> the only modules the walk follows from it
LEAVES: dict[str, tuple[str, ...]] = {"pipeline.merging.registry": ()}


def module_file(root: Path, module: str) -> Path | None:
    """The source file of ``module`` under ``root``, or None outside the project."""
    if module.split(".")[0] not in PACKAGES:
        return None
    base = root.joinpath(*module.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


@functools.cache
def _imported(root: Path, module: str, path: Path, source: str) -> frozenset[str]:
    """Project modules that ``module`` (``source``, read from ``path``) imports anywhere in its
    code. Cached by source: the Snakefile asks for about 40 closures that share most modules."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(source, str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            names = [base] + [f"{base}.{alias.name}" for alias in node.names]  # a name may be a submodule
        else:
            continue
        for name in names:
            parts = name.split(".")
            for i in range(1, len(parts) + 1):  # importing a.b.c runs a and a.b too
                if module_file(root, ".".join(parts[:i])):
                    found.add(".".join(parts[:i]))
    return frozenset(found)


@functools.cache
def closure(root: Path, modules: frozenset[str]) -> frozenset[str]:
    """``modules`` and every project module they import, transitively."""
    seen: set[str] = set()
    todo = list(modules)
    while todo:
        module = todo.pop()
        path = module_file(root, module)
        if module in seen or path is None:
            continue
        seen.add(module)
        parts = module.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]  # parent packages
        follow = set(_imported(root, module, path, path.read_text()))
        if module in LEAVES:
            follow &= set(LEAVES[module])
        todo += sorted(follow - seen)
    return frozenset(seen)


def code_version(root: str | Path, modules: Iterable[str]) -> str:
    """Hash of the sources of ``modules`` and their project imports: a job whose code
    version is a param reruns when any of that code changes."""
    root = Path(root).resolve()
    h = hashlib.sha256()
    for module in sorted(closure(root, frozenset(modules))):
        path = module_file(root, module)
        h.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()[:16]
