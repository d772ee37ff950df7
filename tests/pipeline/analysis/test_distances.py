"""L2 distances between models and cosines between task vectors, and their figure."""
import numpy as np
import pytest
import torch
from helpers.analysis import _models, _png

from pipeline.analysis import distances
from pipeline.models.checkpoints import save_state_dict


def test_l2_of_a_model_with_itself_is_zero_and_distances_are_exact(tmp_path):
    files = _models(tmp_path)
    d = distances.l2_distances({"x": files["finetuned_t0"], "y": files["finetuned_t0"]})
    assert list(d.columns) == ["a", "b", "l2"] and (d["l2"] == 0).all()
    d = distances.l2_distances(files, {"pretrained": "visual."})
    assert len(d) == 9
    m = d.set_index(["a", "b"])["l2"]
    assert m[("pretrained", "pretrained")] == 0
    assert m[("pretrained", "finetuned_t0")] == pytest.approx(0.1 * np.sqrt(17), rel=1e-5)
    assert m[("finetuned_t1", "finetuned_t0")] == pytest.approx(0.1 * np.sqrt(17), rel=1e-5)
    assert m[("pretrained", "finetuned_t1")] == m[("finetuned_t1", "pretrained")]
    distances.plot_matrix(d, "l2", tmp_path / "d.png", "L2")
    _png(tmp_path / "d.png")


def test_cosine_of_task_vectors_from_the_store(tmp_path):
    from pipeline.store.task_vectors import TaskVectorStore, write_task_vector

    pre = {"w": torch.zeros(6), "v": torch.zeros(2, 2)}
    vectors = {"t0": {"w": torch.tensor([1.0, 0, 0, 0, 0, 0]), "v": torch.zeros(2, 2)},
               "t1": {"w": torch.tensor([1.0, 1, 0, 0, 0, 0]), "v": torch.zeros(2, 2)},
               "t2": {"w": torch.zeros(6), "v": -torch.ones(2, 2)}}
    for t, sd in vectors.items():
        save_state_dict(sd, tmp_path / f"{t}.safetensors")
        write_task_vector(tmp_path / "tv.zarr", t, pre, sd, tmp_path / f"{t}.safetensors", chunk_mib=1e-5)
    cos = distances.cosine_matrix(TaskVectorStore(tmp_path / "tv.zarr", list(vectors)))
    assert list(cos.columns) == ["a", "b", "cosine"]
    c = cos.set_index(["a", "b"])["cosine"]
    assert c[("t0", "t1")] == pytest.approx(1 / np.sqrt(2)) and c[("t0", "t2")] == 0 and c[("t2", "t2")] == pytest.approx(1)
    distances.plot_matrix(cos, "cosine", tmp_path / "c.png", "cos", cmap="RdBu_r", fmt="{:.2f}", vmin=-1, vmax=1)
    _png(tmp_path / "c.png")
