"""Code versions derived from imports: the walk sees function-level imports, parent
packages and submodules named in ``from`` imports, and stops at the registry."""

from pathlib import Path

from pipeline import provenance


def write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_closure_follows_every_kind_of_import(tmp_path):
    write(tmp_path, {
        "pipeline/__init__.py": "",
        "pipeline/a.py": "import torch\n\ndef f():\n    from pipeline.sub import b\n",
        "pipeline/sub/__init__.py": "",
        "pipeline/sub/b.py": "from . import c\n",
        "pipeline/sub/c.py": "import kernels.k\n",
        "pipeline/unused.py": "",
        "kernels/__init__.py": "",
        "kernels/k.py": "",
    })
    got = provenance.closure(tmp_path, frozenset({"pipeline.a"}))
    assert got == {"pipeline", "pipeline.a", "pipeline.sub", "pipeline.sub.b", "pipeline.sub.c", "kernels",
                   "kernels.k"}


def test_the_registry_is_a_leaf_and_edits_change_the_version(tmp_path):
    write(tmp_path, {
        "pipeline/__init__.py": "",
        "pipeline/report.py": "from pipeline.merging import registry\n",
        "pipeline/merging/__init__.py": "",
        "pipeline/merging/registry.py": "from pipeline.merging import ties\n",
        "pipeline/merging/ties.py": "",
    })
    assert "pipeline.merging.ties" not in provenance.closure(tmp_path, frozenset({"pipeline.report"}))
    before = provenance.code_version(tmp_path, ["pipeline.report"])
    (tmp_path / "pipeline/merging/ties.py").write_text("# edited\n")
    assert provenance.code_version(tmp_path, ["pipeline.report"]) == before
    (tmp_path / "pipeline/merging/registry.py").write_text("from pipeline.merging import ties  # a label\n")
    assert provenance.code_version(tmp_path, ["pipeline.report"]) != before
    with_method = provenance.code_version(tmp_path, ["pipeline.report", "pipeline.merging.ties"])
    (tmp_path / "pipeline/merging/ties.py").write_text("# edited again\n")
    assert provenance.code_version(tmp_path, ["pipeline.report", "pipeline.merging.ties"]) != with_method
