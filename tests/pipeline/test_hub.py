"""Hub snapshots through the local stand-in Hub: what is fetched, the manifest, the cache
used offline, one clear error per failure, and the split files of dataset layouts."""

import hashlib
import json
import os
from pathlib import Path

import pytest
from helpers.hub_server import HubServer, add_repo, use_hub

from pipeline.hub import (
    FileInfo,
    HubError,
    HubGatedError,
    HubNetworkError,
    HubOfflineError,
    HubRepoNotFoundError,
    HubRevisionNotFoundError,
    dataset_split_files,
    download,
    read_manifest,
    write_manifest,
)

TOKEN = "hf_granted"
CLIP = {"config.json": b'{"model_type": "clip"}', "model.safetensors": os.urandom(3000),
        "pytorch_model.bin": os.urandom(2000), "tokenizer.json": b"{}", "README.md": b"# tiny",
        "onnx/model.safetensors": b"not at the top level"}
DATASET = {"data/test-00000-of-00001.parquet": os.urandom(1500), "data/train-00000-of-00001.parquet": os.urandom(900),
           "README.md": b"---\nlicense: mit\n---", ".gitattributes": b"*.parquet filter=lfs"}


@pytest.fixture
def root(tmp_path) -> Path:
    root = tmp_path / "hub"
    add_repo(root, "org/tiny-clip", CLIP)
    add_repo(root, "org/tiny-clip", {"config.json": b"{}", "model.safetensors": b"v1 weights"}, revision="v1")
    add_repo(root, "org/bin-only", {"config.json": b"{}", "pytorch_model.bin": b"pickled"})
    add_repo(root, "org/no-weights", {"config.json": b"{}", "flax_model.msgpack": b"flax"})
    add_repo(root, "org/gated", {"config.json": b"{}", "model.safetensors": b"licensed"})
    add_repo(root, "org/tiny-ds", DATASET, repo_type="dataset")
    return root


@pytest.fixture
def cache(tmp_path) -> Path:
    return tmp_path / "hf-cache"


@pytest.fixture
def hub(root, cache, monkeypatch):
    with HubServer(root, gated=["org/gated"], token=TOKEN) as hub:
        use_hub(monkeypatch, hub, cache)
        yield hub


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_model_gets_config_tokenizer_and_safetensors_only(hub, cache, tmp_path):
    snap = download("org/tiny-clip", "main")
    commit = hub.commit("org/tiny-clip")
    assert (snap.repo_id, snap.repo_type, snap.revision, snap.commit) == ("org/tiny-clip", "model", "main", commit)
    assert snap.path == cache / "models--org--tiny-clip" / "snapshots" / commit
    names = ["config.json", "model.safetensors", "tokenizer.json"]
    assert snap.files == {n: FileInfo(sha256(CLIP[n]), len(CLIP[n])) for n in names}
    assert sorted(p.name for p in snap.path.iterdir()) == names  # no pickle, README or onnx/ fetched
    assert (snap.path / "model.safetensors").read_bytes() == CLIP["model.safetensors"]

    write_manifest(snap, tmp_path / "m" / "model.json")
    assert read_manifest(tmp_path / "m" / "model.json") == snap
    manifest = json.loads((tmp_path / "m" / "model.json").read_text())
    assert manifest["commit"] == commit and manifest["files"]["config.json"]["sha256"] == sha256(CLIP["config.json"])


def test_model_without_safetensors_gets_its_pickle(hub):
    assert list(download("org/bin-only", "main").files) == ["config.json", "pytorch_model.bin"]


def test_model_without_weights_is_refused_naming_its_files(hub):
    with pytest.raises(HubError, match=r"org/no-weights.*no weights.*flax_model\.msgpack"):
        download("org/no-weights", "main")


def test_a_cached_snapshot_costs_one_look_up_online_and_none_offline(root, cache, monkeypatch):
    with HubServer(root) as hub:
        use_hub(monkeypatch, hub, cache)
        model, data = download("org/tiny-clip", "main"), download("org/tiny-ds", "main", "dataset")
        hub.requests.clear()
        assert download("org/tiny-clip", "main") == model
        assert hub.requests == ["GET /api/models/org/tiny-clip/revision/main"]  # the branch's commit, no file
    use_hub(monkeypatch, hub, cache, offline=True)  # and the server is gone
    assert download("org/tiny-clip", "main") == model
    assert download("org/tiny-ds", "main", "dataset") == data
    assert download("org/tiny-clip", model.commit).files == model.files


def test_pinned_revisions_tag_and_commit(hub):
    v1 = download("org/tiny-clip", "v1")
    assert v1.commit == hub.commit("org/tiny-clip", revision="v1") != hub.commit("org/tiny-clip")
    assert v1.files["model.safetensors"] == FileInfo(sha256(b"v1 weights"), 10)
    commit = hub.commit("org/tiny-clip")
    hub.requests.clear()
    pinned = download("org/tiny-clip", commit)
    assert pinned.commit == commit and pinned.revision == commit
    assert not any("/revision/" in r for r in hub.requests)  # a commit needs no resolving


def test_dataset_gets_parquet_and_readme(hub):
    snap = download("org/tiny-ds", "main", repo_type="dataset")
    assert snap.commit == hub.commit("org/tiny-ds", "dataset")
    assert snap.files == {n: FileInfo(sha256(DATASET[n]), len(DATASET[n])) for n in sorted(DATASET)
                          if n != ".gitattributes"}
    assert dataset_split_files(snap.path, "test") == [snap.path / "data/test-00000-of-00001.parquet"]
    only = download("org/tiny-ds", "main", "dataset", allow_patterns=["data/train-*"])
    assert list(only.files) == ["data/train-00000-of-00001.parquet"]


def test_offline_and_not_cached(hub, cache, monkeypatch):
    use_hub(monkeypatch, hub, cache, offline=True)
    with pytest.raises(HubOfflineError, match=r"HF_HUB_OFFLINE is set and model 'org/tiny-clip' at revision 'main' "
                                              r"is not \(completely\) in the Hub cache"):
        download("org/tiny-clip", "main")
    assert hub.requests == []


def test_offline_with_part_of_the_snapshot_cached(hub, cache, monkeypatch):
    download("org/tiny-ds", "main", "dataset", allow_patterns=["data/train-*"])
    use_hub(monkeypatch, hub, cache, offline=True)
    with pytest.raises(HubOfflineError, match="org/tiny-ds"):
        download("org/tiny-ds", "main", "dataset")


def test_hub_unreachable_and_not_cached(root, cache, monkeypatch):
    with HubServer(root) as hub:
        use_hub(monkeypatch, hub, cache)
    with pytest.raises(HubNetworkError, match=r"could not reach the Hub \(ConnectError.*org/tiny-clip.*"
                                              r"HF_HUB_OFFLINE=1"):
        download("org/tiny-clip", "main")


def test_gated_repo_needs_a_granted_token(hub, monkeypatch):
    with pytest.raises(HubGatedError, match=r"'org/gated'.* is gated: accept .*`hf auth login`.*HF_TOKEN"):
        download("org/gated", "main")
    monkeypatch.setenv("HF_TOKEN", "hf_someone_else")
    with pytest.raises(HubGatedError):
        download("org/gated", "main")
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    assert download("org/gated", "main").files["model.safetensors"].size == len(b"licensed")


@pytest.mark.parametrize("repo_type", ["model", "dataset"])
def test_unknown_repo(hub, repo_type):
    with pytest.raises(HubRepoNotFoundError, match=rf"{repo_type} 'org/missing'.*no such repo.*check the repo id"):
        download("org/missing", "main", repo_type)


@pytest.mark.parametrize("revision", ["v2", "0" * 40])
def test_unknown_revision(hub, revision):
    with pytest.raises(HubRevisionNotFoundError, match=rf"'org/tiny-clip' at revision '{revision}'.*no such revision"):
        download("org/tiny-clip", revision)


@pytest.mark.parametrize("name", ["model.safetensors", "config.json"])  # blob named by sha256, by git hash
def test_a_corrupted_cache_file_is_caught(hub, name):
    snap = download("org/tiny-clip", "main")
    blob = (snap.path / name).resolve()
    blob.write_bytes(b"bit rot")
    with pytest.raises(HubError, match=rf"{name} of model 'org/tiny-clip'.*{blob.name}.*corrupted"):
        download("org/tiny-clip", "main")


def test_manifest_of_a_cleared_cache_is_refused(hub, tmp_path):
    snap = download("org/tiny-ds", "main", "dataset")
    write_manifest(snap, tmp_path / "ds.json")
    (snap.path / "README.md").unlink()
    with pytest.raises(FileNotFoundError, match=r"README\.md of org/tiny-ds.*delete .*ds\.json and download again"):
        read_manifest(tmp_path / "ds.json")
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ValueError, match="not a download manifest"):
        read_manifest(tmp_path / "bad.json")


@pytest.mark.parametrize("files, split, config, expected", [
    (["data/test-00000-of-00002.parquet", "data/test-00001-of-00002.parquet", "data/train-00000-of-00001.parquet"],
     "test", None, [0, 1]),
    (["data/test-00000-of-00001-c6f70f06056769bf.parquet", "data/train-00000-of-00001-0f9e7a1b2c3d4e5f.parquet"],
     "train", None, [1]),
    (["cropped_digits/test-00000-of-00001.parquet", "cropped_digits/extra-00000-of-00002.parquet",
      "full_numbers/test-00000-of-00001.parquet"], "test", "cropped_digits", [0]),
    (["cropped_digits/extra-00001-of-00002.parquet", "cropped_digits/extra-00000-of-00002.parquet",
      "cropped_digits/train-00000-of-00001.parquet"], "extra", None, [1, 0]),
    (["test/0001.parquet", "test/0000.parquet", "train/0000.parquet"], "test", None, [1, 0]),
    (["default/test/0000.parquet", "default/train/0000.parquet"], "test", "default", [0]),
    (["mnist/test-00000-of-00001.parquet", "mnist/train-00000-of-00001.parquet"], "train", "mnist", [1]),
    (["svhn-test.parquet", "svhn-train.parquet"], "test", None, [0]),
])
def test_split_files_of_the_hub_layouts(tmp_path, files, split, config, expected):
    for f in files:
        (tmp_path / f).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / f).touch()
    assert dataset_split_files(tmp_path, split, config) == sorted(tmp_path / files[i] for i in expected)


def test_split_files_errors_name_what_there_is(tmp_path):
    for f in ["cropped_digits/test-00000-of-00001.parquet", "full_numbers/test-00000-of-00001.parquet",
              "cropped_digits/train-00000-of-00001.parquet"]:
        (tmp_path / f).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / f).touch()
    with pytest.raises(FileNotFoundError, match=r"no split 'val' in the dataset snapshot .*found: "
                                                r"test \(cropped_digits\), train \(cropped_digits\), test \(full_n"):
        dataset_split_files(tmp_path, "val")
    with pytest.raises(FileNotFoundError, match="no split 'train' in config 'full_numbers' of"):
        dataset_split_files(tmp_path, "train", "full_numbers")
    with pytest.raises(ValueError, match=r"'test' is in several configs .*\['cropped_digits', 'full_numbers'\]"):
        dataset_split_files(tmp_path, "test")
