"""Fisher merging: equal Fishers average, and the diagonal Fisher follows the data."""
import pytest
import torch
from helpers.merging import _classification
from torch import nn
from torch.utils.data import TensorDataset

from pipeline.merging import fisher_merging, registry
from pipeline.merging.contract import Inputs


@pytest.mark.parametrize("normalize", [True, False])
def test_fisher_with_equal_fishers_is_averaging(normalize):
    g = torch.Generator().manual_seed(2)
    states = [{"w": torch.randn(3, 4, generator=g), "buf": torch.randn(2, generator=g), "n": torch.tensor(7)}
              for _ in range(3)]
    fisher = {"w": torch.rand(3, 4, generator=g)}
    merged = fisher_merging.fisher_average([(s, fisher) for s in states], normalize=normalize)
    for key in ("w", "buf"):
        torch.testing.assert_close(merged[key], torch.stack([s[key] for s in states]).mean(0))
    assert merged["n"] == 7


def test_fisher_weights_follow_the_data():
    torch.manual_seed(0)
    encoder = nn.Linear(6, 4)
    head = torch.randn(2, 4) * 5
    x, y = _classification(0)
    fisher = fisher_merging.diagonal_fisher(encoder, head, TensorDataset(x, y), examples=32)
    assert fisher.keys() == dict(encoder.named_parameters()).keys()
    assert all((f >= 0).all() and f.sum() > 0 for f in fisher.values())
    # a model that is unchanged by fine-tuning is returned unchanged
    state = {k: v.clone() for k, v in encoder.state_dict().items()}
    inputs = Inputs({}, ["a", "b"], encoder=encoder, finetuned=[state, state], heads=[head, -head],
                    train=[TensorDataset(x, y)] * 2)
    got = registry.method("fisher_merging").run(inputs, fisher_merging.Settings(examples=16)).state_dict()
    for k in state:
        torch.testing.assert_close(got[k], state[k])
