"""Multi-task learning learns every task of a tiny zoo."""
from helpers.merging import _tiny_zoo, train_jointly
from torch.utils.data import TensorDataset

from pipeline.evaluation import accuracy


def test_multitask_learns_every_task():
    encoder, pre, heads, data = _tiny_zoo()
    before = [accuracy(encoder, h, TensorDataset(*d))["accuracy"] for h, d in zip(heads, data)]
    state = train_jointly(encoder, heads, data)
    encoder.load_state_dict(state)
    after = [accuracy(encoder, h, TensorDataset(*d))["accuracy"] for h, d in zip(heads, data)]
    assert all(a > 85 and a > b for a, b in zip(after, before)), (before, after)
