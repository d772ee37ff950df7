"""Atomic writes: the one helper every writer uses."""
import os
import stat

import pytest

from pipeline.io import atomic_path, write_json


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def umask_027():
    old = os.umask(0o027)
    yield
    os.umask(old)


def test_file_published_with_umask_mode_and_parents(tmp_path, umask_027):
    out = tmp_path / "a" / "b" / "x.json"
    with atomic_path(out) as tmp:
        assert tmp.parent == out.parent and tmp.name.startswith(".x.json.") and tmp.name.endswith(".tmp")
        assert not out.exists()
        tmp.write_text("1")
    assert out.read_text() == "1" and mode(out) == 0o640  # not mkstemp's 0o600
    assert os.listdir(out.parent) == ["x.json"]


def test_directory_published_with_umask_mode_replacing_the_old_one(tmp_path, umask_027):
    out = tmp_path / "group"
    (out / "stale").mkdir(parents=True)
    with atomic_path(out, directory=True, dir=tmp_path, prefix=".store.group.") as tmp:
        assert tmp.name.startswith(".store.group.") and tmp.is_dir()
        (tmp / "new").write_text("x")
    assert sorted(os.listdir(out)) == ["new"] and mode(out) == 0o750  # not mkdtemp's 0o700
    assert sorted(os.listdir(tmp_path)) == ["group"]


@pytest.mark.parametrize("error", [ValueError, KeyboardInterrupt])
@pytest.mark.parametrize("directory", [False, True])
def test_any_failure_keeps_the_old_output_and_no_temporary(tmp_path, error, directory):
    out = tmp_path / "out"
    if directory:
        out.mkdir()
        (out / "old").write_text("1")
    else:
        write_json({"old": 1}, out)
    with pytest.raises(error), atomic_path(out, directory) as tmp:
        (tmp / "half" if directory else tmp).write_text("half")
        raise error("killed")
    assert sorted(os.listdir(tmp_path)) == ["out"]
    assert (out / "old").read_text() == "1" if directory else out.read_text() == '{\n  "old": 1\n}'
