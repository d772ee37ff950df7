import hashlib
import os
import sys
import textwrap

import pytest
import torch
from helpers.task_vectors_release import ImageEncoder
from safetensors.torch import load_file, save_file

import pipeline.models.checkpoints as ckpt
from pipeline.models.checkpoints import (
    SafetensorsWriter,
    check_compatible,
    load_state_dict,
    save_state_dict,
    sha256_file,
    state_dict_hash,
)
from pipeline.models.clip import SYNTHETIC_ARCH, create_model


@pytest.fixture(scope="module")
def clip():
    return create_model(SYNTHETIC_ARCH, seed=0)


@pytest.fixture(scope="module")
def visual(clip):
    return {k: v.clone() for k, v in clip.visual.state_dict().items()}


def assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_save_state_dict_round_trip_of_views_and_shared_storage(tmp_path):
    base = torch.arange(12.0).reshape(3, 4)
    sd = {"t": base.t(), "row0": base[0], "row1": base[1], "scalar": torch.tensor(2.5)}
    path = tmp_path / "sub" / "sd.safetensors"
    save_state_dict(sd, path)
    assert_same(load_file(str(path)), {k: v.contiguous() for k, v in sd.items()})
    assert [p.name for p in path.parent.iterdir()] == ["sd.safetensors"]


def test_save_state_dict_killed_midway_keeps_old_file_and_no_temp(tmp_path, monkeypatch):
    path = tmp_path / "sd.safetensors"
    save_state_dict({"a": torch.ones(2)}, path)

    def dies_midway(tensors, filename):
        with open(filename, "wb") as f:
            f.write(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(ckpt, "save_file", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        save_state_dict({"a": torch.zeros(2)}, path)
    assert [p.name for p in tmp_path.iterdir()] == ["sd.safetensors"]
    assert torch.equal(load_file(str(path))["a"], torch.ones(2))


def test_sha256_file(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(b"abc" * 1000)
    assert sha256_file(path) == hashlib.sha256(b"abc" * 1000).hexdigest()


def test_state_dict_hash_sees_content_dtype_and_shape_not_order(tmp_path):
    a, b = torch.randn(2, 3), torch.tensor([1, 2], dtype=torch.int64)
    h = state_dict_hash({"a": a, "b": b})
    assert h == state_dict_hash({"b": b.clone(), "a": a.clone()})
    save_state_dict({"a": a, "b": b}, tmp_path / "x.safetensors")
    assert h == state_dict_hash(load_file(str(tmp_path / "x.safetensors")))
    changed = a.clone()
    changed[1, 2] += 1e-3
    assert h != state_dict_hash({"a": changed, "b": b})
    assert h != state_dict_hash({"a": a.view(torch.int32), "b": b})  # same bytes, other dtype
    assert h != state_dict_hash({"a": a.reshape(3, 2), "b": b})  # same bytes, other shape
    assert h != state_dict_hash({"a2": a, "b": b})


def test_load_safetensors_and_weights_only_pt(tmp_path, visual):
    save_state_dict(visual, tmp_path / "enc.safetensors")
    torch.save(visual, tmp_path / "enc.pt")
    assert_same(load_state_dict(tmp_path / "enc.safetensors"), visual)
    assert_same(load_state_dict(tmp_path / "enc.pt"), visual)


def test_files_are_recognised_by_content_not_suffix(tmp_path, visual):
    save_state_dict(visual, tmp_path / "safetensors_file")
    torch.save(visual, tmp_path / "zip_file.safetensors")  # a misleading suffix
    torch.save(visual, tmp_path / "legacy_file", _use_new_zipfile_serialization=False)
    for name in ("safetensors_file", "zip_file.safetensors", "legacy_file"):
        assert_same(load_state_dict(tmp_path / name), visual)
    (tmp_path / "notes.pt").write_text("not a checkpoint")
    with pytest.raises(ValueError, match=r"notes\.pt is neither a safetensors file nor a torch\.save file"):
        load_state_dict(tmp_path / "notes.pt")
    (tmp_path / "empty.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match=r"cannot read \S+empty\.safetensors \(an empty file\).*download it again"):
        load_state_dict(tmp_path / "empty.safetensors")


@pytest.mark.parametrize(
    "wrap",
    [
        lambda sd: sd,  # the full CLIP: visual.* plus the text tower, which is dropped
        lambda sd: {f"model.{k}": v for k, v in sd.items()},
        lambda sd: {"state_dict": {f"module.{k}": v for k, v in sd.items()}, "epoch": 3},
    ],
    ids=["visual.", "model.visual.", "open_clip-training-checkpoint"],
)
def test_load_strips_prefixes_and_drops_other_keys(tmp_path, clip, visual, wrap):
    torch.save(wrap(clip.state_dict()), tmp_path / "full.pt")
    assert_same(load_state_dict(tmp_path / "full.pt"), visual)


def test_prefix_hint_picks_one_of_several_encoders(tmp_path, visual):
    sd = {**{f"a.{k}": v for k, v in visual.items()}, **{f"b.{k}": v + 1 for k, v in visual.items()}}
    torch.save(sd, tmp_path / "two.pt")
    with pytest.raises(ValueError, match="several image encoders.*prefix_hint"):
        load_state_dict(tmp_path / "two.pt")
    assert_same(load_state_dict(tmp_path / "two.pt", prefix_hint="b."), {k: v + 1 for k, v in visual.items()})
    with pytest.raises(ValueError, match="prefix_hint 'c.'"):
        load_state_dict(tmp_path / "two.pt", prefix_hint="c.")


def test_release_pickle_refused_without_flag_and_loaded_with_it(tmp_path):
    encoder = ImageEncoder(seed=3)
    path = tmp_path / "finetuned.pt"
    torch.save(encoder, path)
    with pytest.raises(ValueError) as err:
        load_state_dict(path)
    msg = str(err.value)
    assert str(path) in msg and "runs code from the file" in msg and "trust_pickles: true" in msg
    assert_same(load_state_dict(path, trust_pickles=True), encoder.model.visual.state_dict())


def test_release_pickle_whose_class_is_not_importable(tmp_path, monkeypatch):
    """The release names src.modeling.ImageEncoder, which is not importable here."""
    src = tmp_path / "src_pkg"
    src.mkdir()
    (src / "tv_modeling_stub.py").write_text(
        textwrap.dedent(
            """
            from torch import nn
            from pipeline.models.clip import SYNTHETIC_ARCH, create_model

            class ImageEncoder(nn.Module):
                def __init__(self):
                    super().__init__()
                    self.model = create_model(SYNTHETIC_ARCH, seed=5)
                    self.cache_dir = "/somewhere"
            """
        )
    )
    monkeypatch.syspath_prepend(str(src))
    import tv_modeling_stub

    encoder = tv_modeling_stub.ImageEncoder()
    torch.save(encoder, tmp_path / "finetuned.pt")
    monkeypatch.delitem(sys.modules, "tv_modeling_stub")
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p != str(src)])
    with pytest.warns(UserWarning, match="tv_modeling_stub.ImageEncoder is not importable"):
        sd = load_state_dict(tmp_path / "finetuned.pt", trust_pickles=True)
    assert_same(sd, encoder.model.visual.state_dict())


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_or_inf_refused_naming_key_and_file(tmp_path, visual, bad):
    sd = {k: v.clone() for k, v in visual.items()}
    sd["transformer.resblocks.1.mlp.c_fc.weight"][0, 0] = bad
    save_file(sd, str(tmp_path / "bad.safetensors"))
    key = r"'transformer\.resblocks\.1\.mlp\.c_fc\.weight'"
    with pytest.raises(ValueError, match=rf"bad\.safetensors: tensor {key} contains NaN or Inf"):
        load_state_dict(tmp_path / "bad.safetensors")


def test_not_an_encoder_and_missing_file(tmp_path):
    torch.save({"fc.weight": torch.ones(2, 2)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match=r"other\.pt holds no open_clip ViT image encoder.*fc\.weight"):
        load_state_dict(tmp_path / "other.pt")
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        load_state_dict(tmp_path / "nope.pt")


def test_check_compatible_names_both_files_and_the_key(visual):
    check_compatible(visual, {k: v.clone() for k, v in visual.items()}, "pre.safetensors", "ft.pt")
    wrong_shape = {**visual, "proj": torch.zeros(3, 3)}
    with pytest.raises(ValueError, match=r"ft\.pt does not match pre\.safetensors at 'proj'.*\(3, 3\)"):
        check_compatible(visual, wrong_shape, "pre.safetensors", "ft.pt")
    wrong_dtype = {**visual, "ln_post.weight": visual["ln_post.weight"].half()}
    with pytest.raises(ValueError, match=r"ft\.pt does not match pre\.safetensors at 'ln_post\.weight'.*float16"):
        check_compatible(visual, wrong_dtype, "pre.safetensors", "ft.pt")
    missing = {k: v for k, v in visual.items() if k != "class_embedding"}
    with pytest.raises(ValueError, match=r"keys missing from ft\.pt: \['class_embedding'\]"):
        check_compatible(visual, missing, "pre.safetensors", "ft.pt")


def test_safetensors_writer_round_trip_and_abort(tmp_path):
    specs = [("a", torch.float32, (2, 3)), ("b", torch.float16, (4,))]
    a, b = torch.arange(6.0).reshape(2, 3), torch.ones(4, dtype=torch.float16)
    writer = SafetensorsWriter(tmp_path / "m.safetensors", specs, {"k": "v"})
    writer.write("a", a.reshape(-1)[:4])
    writer.write("a", a.reshape(-1)[4:])
    writer.write("b", b)
    writer.close([("b", torch.tensor([2]), torch.tensor([5.0]))])
    got = load_file(tmp_path / "m.safetensors")
    assert torch.equal(got["a"], a) and got["b"].tolist() == [1, 1, 5, 1]
    assert os.listdir(tmp_path) == ["m.safetensors"]

    writer = SafetensorsWriter(tmp_path / "n.safetensors", specs)
    writer.file.close()  # e.g. a failed flush: abort must still remove the temporary file
    writer.file = type("Broken", (), {"close": lambda self: (_ for _ in ()).throw(OSError("disk full"))})()
    writer.abort()
    assert os.listdir(tmp_path) == ["m.safetensors"]


@pytest.mark.parametrize("fmt", ["safetensors", "zip", "legacy"])
@pytest.mark.parametrize("cut", ["half", "header", "empty"])
def test_truncated_files_are_refused_naming_the_file_and_the_fix(tmp_path, visual, fmt, cut):
    from pipeline.zoo.store import load_encoder_state, load_head

    whole = tmp_path / "whole"
    if fmt == "safetensors":
        save_state_dict(visual, whole)
    else:
        torch.save(visual, whole, _use_new_zipfile_serialization=fmt == "zip")
    data = whole.read_bytes()
    bad = tmp_path / "cut.bin"
    bad.write_bytes(data[: {"half": len(data) // 2, "header": 20, "empty": 0}[cut]])
    fix = r"cannot read \S+cut\.bin .*truncated or damaged.*rebuild it .* or download it again"
    readers = [load_state_dict, lambda p: load_state_dict(p, trust_pickles=True)]
    if fmt == "safetensors":  # the pipeline's own files
        readers += [load_encoder_state, load_head, ckpt.load_safetensors]
    for read in readers:
        with pytest.raises(ValueError, match=fix):
            read(bad)


def test_non_finite_models_are_never_written(tmp_path):
    good = {"a": torch.ones(3), "ids": torch.arange(3)}
    save_state_dict(good, tmp_path / "m.safetensors")
    with pytest.raises(ValueError, match=r"refusing to write \S+m\.safetensors: tensor 'a' contains NaN or Inf "
                                         r"\(1 of 3 entries\); the computation diverged"):
        save_state_dict({**good, "a": torch.tensor([1.0, float("nan"), 2.0])}, tmp_path / "m.safetensors")
    assert torch.equal(load_file(tmp_path / "m.safetensors")["a"], torch.ones(3))  # the old file stays
    specs = [("a", torch.float16, (4,)), ("b", torch.float32, (2,))]
    writer = SafetensorsWriter(tmp_path / "s.safetensors", specs)
    writer.write("a", torch.ones(2, dtype=torch.float16))
    with pytest.raises(ValueError, match=r"s\.safetensors: tensor 'a\[2:4\]' contains NaN or Inf \(1 of 2"):
        writer.write("a", torch.tensor([1.0, float("inf")], dtype=torch.float16))
    writer.abort()
    writer = SafetensorsWriter(tmp_path / "s.safetensors", specs)
    writer.write("a", torch.ones(4, dtype=torch.float16))
    writer.write("b", torch.ones(2))
    with pytest.raises(ValueError, match=r"tensor 'b \(patched entries\)' contains NaN or Inf"):
        writer.close([("b", torch.tensor([1]), torch.tensor([float("nan")]))])
    assert sorted(os.listdir(tmp_path)) == ["m.safetensors"]  # close removed the temporary file


def test_safetensors_writer_on_a_full_disk_leaves_no_temporary(tmp_path, monkeypatch):
    import errno

    writer = SafetensorsWriter(tmp_path / "m.safetensors", [("a", torch.float32, (4,))])
    writer.write("a", torch.ones(4))
    real_close = writer.file.close

    def full_disk():
        real_close()
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(writer.file, "close", full_disk, raising=False)
    with pytest.raises(OSError, match="No space left"):
        writer.close()
    assert os.listdir(tmp_path) == []
