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


@pytest.mark.parametrize("directory", [False, True])
def test_temporaries_of_a_killed_write_are_removed_by_the_next_write(tmp_path, directory):
    out = tmp_path / "x"
    killed = atomic_path(out, directory)  # a SIGKILL before commit or discard: nothing removes it
    (killed.tmp / "half" if directory else killed.tmp).write_text("half")
    others = [tmp_path / ".x.json.abcd1234.tmp", tmp_path / ".y.abcd1234.tmp"]  # other outputs' temporaries
    for other in others:
        other.write_text("theirs")
    with atomic_path(out, directory) as tmp:
        (tmp / "new" if directory else tmp).write_text("new")
    assert not killed.tmp.exists() and all(other.exists() for other in others)
    assert sorted(os.listdir(tmp_path)) == sorted(["x", *(o.name for o in others)])


def test_concurrent_writers_keep_each_others_temporaries(tmp_path):
    out = tmp_path / "x"
    first = atomic_path(out, exclusive=False)
    with atomic_path(out, exclusive=False) as tmp:
        tmp.write_text("second")
    first.tmp.write_text("first")
    assert first.commit() == out and out.read_text() == "first"


@pytest.mark.parametrize("writer", ["json", "parquet"])
def test_a_failed_table_write_leaves_no_temporary(tmp_path, writer, monkeypatch):
    import errno

    import pandas as pd

    from pipeline.io import write_parquet

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pd.DataFrame, "to_parquet", disk_full)
    monkeypatch.setattr("pathlib.Path.write_text", disk_full)
    with pytest.raises(OSError, match="No space left"):
        if writer == "json":
            write_json({"a": 1}, tmp_path / "out.json")
        else:
            write_parquet(pd.DataFrame({"a": [1]}), tmp_path / "out.parquet")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("umask, expected", [(0o022, 0o644), (0o002, 0o664)])
def test_outputs_are_group_readable_under_the_usual_umasks(tmp_path, umask, expected):
    old = os.umask(umask)
    try:
        write_json({"a": 1}, tmp_path / "x.json")
    finally:
        os.umask(old)
    assert mode(tmp_path / "x.json") == expected
