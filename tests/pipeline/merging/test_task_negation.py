"""Task negation: the dense negated task vector, and lower accuracy on the negated task."""
import pytest
from helpers.merging import _tiny_zoo, assert_state_close, dense_tvs, merged, train_jointly, unflatten
from safetensors.torch import save_file
from torch.utils.data import TensorDataset

from pipeline.evaluation import accuracy
from pipeline.store.task_vectors import TaskVectorStore, write_task_vector


def test_task_negation_subtracts(zoo, tmp_path):
    pre, fts, _ = zoo
    only_a = TaskVectorStore(tmp_path / "tv.zarr", ["a"])
    tvs = dense_tvs(pre, {"a": fts["a"]})
    assert_state_close(merged("task_negation", pre, only_a, lam=-0.5), unflatten(pre, tvs[0], -0.5), exact=True)
    with pytest.raises(ValueError, match="negative lambda"):
        merged("task_negation", pre, only_a, lam=0.5)


def test_task_negation_lowers_the_negated_task(tmp_path):
    encoder, pre, heads, data = _tiny_zoo()
    tuned = train_jointly(encoder, heads[:1], data[:1])
    save_file(tuned, tmp_path / "a.safetensors")
    write_task_vector(tmp_path / "tv.zarr", "a", pre, tuned, tmp_path / "a.safetensors")
    negated = merged("task_negation", pre, TaskVectorStore(tmp_path / "tv.zarr", ["a"]), lam=-1.0)

    def acc(state):
        encoder.load_state_dict(state)
        return accuracy(encoder, heads[0], TensorDataset(*data[0]))["accuracy"]

    assert acc(tuned) > acc(pre) > acc(negated)
