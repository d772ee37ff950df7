"""Fisher merging: equal Fishers average; the exact diagonal Fisher against a float64 brute force,
the sampled one converging to it, FusionBench's estimator against its formula."""
import copy

import pytest
import torch
import torch.nn.functional as F
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


@pytest.mark.parametrize("estimator", fisher_merging.ESTIMATORS)
def test_non_finite_predictions_are_refused_naming_the_example(estimator):
    encoder = nn.Linear(6, 4)
    x, y = _classification(0)
    x[3] = float("nan")
    with pytest.raises(FloatingPointError, match=r"fisher a: the predictions on training example 3 are NaN or Inf"):
        fisher_merging.diagonal_fisher(encoder, torch.randn(2, 4), TensorDataset(x, y), examples=len(x),
                                       estimator=estimator, desc="fisher a")


def test_an_unknown_estimator_is_refused_naming_the_known_ones():
    with pytest.raises(ValueError, match=r"fisher_merging: unknown estimator 'empirical'; known: exact, sampled, "
                                         r"fusionbench"):
        registry.method("fisher_merging").configure({"estimator": "empirical"})


def _brute_force_fisher(encoder, head, x):
    """1/N sum_x sum_c p(c|x) (d log p(c|x) / d theta)^2 in float64: per example, per class,
    autograd of log p, squared, weighted by p."""
    model = copy.deepcopy(encoder).double().eval()
    params = dict(model.named_parameters())
    out = {k: torch.zeros_like(p) for k, p in params.items()}
    for xi in x.double():
        log_p = F.log_softmax(F.normalize(model(xi[None]), dim=-1) @ head.double().T, dim=-1)[0]
        for c in range(len(log_p)):
            grads = torch.autograd.grad(log_p[c], list(params.values()), retain_graph=True)
            for k, g in zip(params, grads):
                out[k] += log_p[c].exp().detach() * g ** 2
    return {k: v / len(x) for k, v in out.items()}


@pytest.fixture(scope="module")
def vit_and_brute_force():
    from pipeline.models.clip import create_model

    encoder = create_model("synth-vit-tiny", seed=0).visual
    g = torch.Generator().manual_seed(5)
    head = F.normalize(torch.randn(4, encoder.output_dim, generator=g), dim=-1) * 20
    x = torch.randn(4, 3, 32, 32, generator=g)
    return encoder, head, x, _brute_force_fisher(encoder, head, x)


@pytest.mark.parametrize("budget_mib", [1024, 1e-6])  # all (example, class) pairs at once; one at a time
def test_exact_fisher_equals_the_float64_brute_force(vit_and_brute_force, budget_mib):
    encoder, head, x, expected = vit_and_brute_force
    got = fisher_merging.diagonal_fisher(encoder, head, TensorDataset(x, torch.zeros(len(x))), examples=len(x),
                                         budget_mib=budget_mib)
    assert got.keys() == expected.keys()
    for k in got:  # float32 gradients against float64: 1.1e-6 of each tensor's largest entry when written
        torch.testing.assert_close(got[k].double(), expected[k], rtol=1e-4, atol=1e-5 * float(expected[k].max()),
                                   msg=k)


def _linear_task():
    torch.manual_seed(0)
    encoder = nn.Linear(6, 4)
    g = torch.Generator().manual_seed(7)
    head = torch.randn(3, 4, generator=g) * 3
    x = torch.randn(4, 6, generator=g)
    return encoder, head, x


def test_the_sampled_fisher_converges_to_the_exact_one_and_fusionbenchs_does_not():
    """Each of 4 examples drawn 1000 times: the one-label estimate's mean is the expectation
    over the classes (1.6% apart when written: 23% with 40 draws, 6.4% with 400); FusionBench's
    squared sum over the classes keeps cross terms that no number of examples removes (93% apart,
    with batches of one)."""
    encoder, head, x = _linear_task()
    data = TensorDataset(x.repeat(1000, 1), torch.zeros(4000))
    exact = fisher_merging.diagonal_fisher(encoder, head, TensorDataset(x, torch.zeros(4)), examples=4)

    def distance(fisher):
        flat = torch.cat([(fisher[k] - exact[k]).reshape(-1) for k in exact])
        return float(flat.norm() / torch.cat([v.reshape(-1) for v in exact.values()]).norm())

    sampled = fisher_merging.diagonal_fisher(encoder, head, data, examples=4000, estimator="sampled")
    fusionbench = fisher_merging.diagonal_fisher(encoder, head, data, examples=4000, estimator="fusionbench",
                                                 batch_size=1)
    assert distance(sampled) < 0.05
    assert distance(fusionbench) > 0.2


def test_fusionbench_fisher_is_its_squared_batch_gradient():
    """FusionBench's formula in float64: per batch the gradient of sum_x sum_c sqrt(p) log p
    (p constant), squared, summed over the batches (of 4 in the seeded order, the last of 2), / N."""
    encoder, head, _ = _linear_task()
    x = torch.randn(10, 6, generator=torch.Generator().manual_seed(8))
    got = fisher_merging.diagonal_fisher(encoder, head, TensorDataset(x, torch.zeros(10)), examples=10,
                                         estimator="fusionbench", batch_size=4, seed=3)
    model = copy.deepcopy(encoder).double()
    params = dict(model.named_parameters())
    expected = {k: torch.zeros_like(p) for k, p in params.items()}
    order = torch.randperm(10, generator=torch.Generator().manual_seed(3))
    for batch in order.split(4):
        log_p = F.log_softmax(F.normalize(model(x[batch].double()), dim=-1) @ head.double().T, dim=-1)
        total = (log_p.detach().exp().sqrt() * log_p).sum()
        for k, grad in zip(params, torch.autograd.grad(total, list(params.values()))):
            expected[k] += grad ** 2
    for k in got:
        torch.testing.assert_close(got[k].double(), expected[k] / 10, rtol=1e-5, atol=1e-7, msg=k)
