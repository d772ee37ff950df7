"""Fisher merging: equal Fishers average, and the diagonal Fisher follows the data."""
import pytest
import torch
from helpers.merging import _classification
from torch import nn
from torch.utils.data import TensorDataset

from pipeline.merging import fisher_merging, registry
from pipeline.merging.contract import Inputs, MergedState


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



def test_an_overflowed_fisher_merge_is_refused_when_saved(tmp_path):
    states = [{"w": torch.ones(2, 3)}, {"w": torch.ones(2, 3)}]
    fishers = [{"w": torch.full((2, 3), float("inf"))}, {"w": torch.ones(2, 3)}]  # squared gradients overflowed
    merge = MergedState(fisher_merging.fisher_average(zip(states, fishers)))
    with pytest.raises(ValueError, match=r"refusing to write \S+m\.safetensors: tensor 'w' contains NaN or Inf "
                                         r"\(6 of 6 entries\)"):
        merge.save(tmp_path / "m.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_non_finite_predictions_are_refused_naming_the_example():
    encoder = nn.Linear(6, 4)
    x, y = _classification(0)
    x[3] = float("nan")
    with pytest.raises(FloatingPointError, match=r"fisher a: the predictions on training example 3 are NaN or Inf"):
        fisher_merging.diagonal_fisher(encoder, torch.randn(2, 4), TensorDataset(x, y), examples=len(x),
                                       desc="fisher a")
