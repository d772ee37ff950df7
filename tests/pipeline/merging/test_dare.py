"""DARE against a dense float64 implementation of its formula, its drop masks' independence of
chunking and budget, and the paper's properties: unbiased in expectation, Binomial survivors."""
import math

import pytest
import torch
from helpers.merging import assert_state_close, dense_ties, dense_tvs, flat, merged, unflatten, vector
from helpers.store import make_store, task_vectors

from pipeline.merging import dare, registry
from pipeline.merging.contract import Inputs


def dense_survivors(store, seed: int, p: float) -> torch.Tensor:
    """(K, d) DARE's keep decisions, in store order."""
    return torch.cat([dare.survivors(seed, store.tasks, key, slice(0, math.prod(store.shapes[key])), p)
                      for key in store.keys], 1)


def dense_dare(tvs: torch.Tensor, keep: torch.Tensor, p: float, base: str, k: float = 20, merge: str = "mean"):
    """The paper's formula in float64: tau_hat = m * tau / (1 - p), then the base merge."""
    dropped = torch.where(keep, tvs.double() / (1 - p), 0.0)
    return dropped.sum(0) if base == "task_arithmetic" else dense_ties(dropped, k, merge)


@pytest.mark.parametrize("base", ["task_arithmetic", "ties"])
@pytest.mark.parametrize("p", [0.3, 0.9])
def test_dare_matches_dense(zoo, base, p):
    pre, fts, store = zoo
    keep = dense_survivors(store, 7, p)
    expected = dense_dare(dense_tvs(pre, fts), keep, p, base)
    torch.testing.assert_close(flat(vector("dare", store, p=p, base=base, seed=7), store).double(), expected,
                               rtol=1e-6, atol=1e-7)
    assert_state_close(merged("dare", pre, store, p=p, base=base, seed=7, lam=0.4),
                       unflatten(pre, 0.4 * expected.float(), 1.0))


@pytest.mark.parametrize("base", ["task_arithmetic", "ties"])
def test_dare_without_dropping_is_its_base(zoo, base):
    _, _, store = zoo
    name = "task_arithmetic" if base == "task_arithmetic" else "ties_merging"
    assert torch.equal(flat(vector("dare", store, p=0.0, base=base), store), flat(vector(name, store), store))


@pytest.mark.parametrize("base", ["task_arithmetic", "ties"])
def test_dare_masks_do_not_depend_on_chunks_budget_or_other_tasks(tmp_path, base):
    """Stores of the same task vectors in 7-, 37- and 500-entry chunks, merged with budgets that
    hold 1 to 16 blocks, give one bit-identical result; a task's mask is the same beside other tasks."""
    values = task_vectors(k=4)
    results = []
    for chunk, budget in ((7, 2 * 7 * 4 * 4 / 2**20), (37, 1.0), (500, 64.0)):  # 1, 16, 16 blocks
        store = make_store(tmp_path / f"c{chunk}", values, chunk_elems=chunk)
        results.append(flat(vector("dare", store, budget_mib=budget, base=base, p=0.6, seed=3), store))
    assert all(torch.equal(r, results[0]) for r in results[1:])
    if base == "task_arithmetic":  # an entry of the sum is zero where all 4 tasks dropped it
        assert abs(float((results[0] == 0).double().mean()) - 0.6**4) < 0.05
    key, span = "proj", slice(0, 165)
    assert torch.equal(dare.survivors(3, ["b", "a"], key, span, 0.6)[1], dare.survivors(3, ["a"], key, span, 0.6)[0])
    assert not torch.equal(dare.survivors(3, ["a"], key, span, 0.6), dare.survivors(4, ["a"], key, span, 0.6))


def test_dare_is_unbiased(zoo):
    """Mean over 64 seeds of DARE-TA -> Task Arithmetic: per entry, z = (mean - TA) / sd with
    the exact variance sum_t tau_t^2 p / (1 - p) / 64; mean z^2 ~ 1 (sd 0.075 over 360 entries)."""
    pre, fts, store = zoo
    p, seeds = 0.5, 64
    tvs = dense_tvs(pre, fts).double()
    mean = sum(flat(vector("dare", store, p=p, seed=s), store).double() for s in range(seeds)) / seeds
    sd = ((tvs ** 2).sum(0) * p / (1 - p) / seeds).sqrt()
    z = (mean - tvs.sum(0)) / sd
    assert 0.75 < float((z ** 2).mean()) < 1.3, float((z ** 2).mean())
    assert float(z.abs().max()) < 5


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_survivors_follow_binomial(p):
    """Survivors in 8000 windows of 64 entries: chi-square against Binomial(64, 1 - p) (bins with
    expected count < 5 pooled); the total within 4 sd of its mean; no correlation between
    neighbouring entries or two tasks' masks."""
    windows, n = 8000, 64
    keep = dare.survivors(11, ["a", "b"], "blocks.0.mlp.c_fc.weight", slice(10**6, 10**6 + windows * n), p)
    counts = keep[0].view(windows, n).sum(1)
    q = 1 - p
    total, mean, var = int(keep[0].sum()), windows * n * q, windows * n * q * p
    assert abs(total - mean) < 4 * math.sqrt(var), (total, mean)
    j = torch.arange(n + 1, dtype=torch.float64)
    pmf = torch.exp(torch.lgamma(torch.tensor(n + 1.0)) - torch.lgamma(j + 1) - torch.lgamma(n - j + 1)
                    + j * math.log(q) + (n - j) * math.log(p))
    expected, observed = windows * pmf, torch.bincount(counts, minlength=n + 1).double()
    bins, e_acc, o_acc = [], 0.0, 0.0
    for e, o in zip(expected.tolist(), observed.tolist()):
        e_acc, o_acc = e_acc + e, o_acc + o
        if e_acc >= 5:
            bins.append((e_acc, o_acc))
            e_acc = o_acc = 0.0
    bins[-1] = (bins[-1][0] + e_acc, bins[-1][1] + o_acc)
    chi2 = sum((o - e) ** 2 / e for e, o in bins)
    p_value = float(torch.special.gammaincc(torch.tensor((len(bins) - 1) / 2), torch.tensor(chi2 / 2)))
    assert p_value > 1e-3, (chi2, len(bins))
    x = keep.double()
    bound = 4 / math.sqrt(x.shape[1])
    assert abs(float(torch.corrcoef(torch.stack([x[0, :-1], x[0, 1:]]))[0, 1])) < bound
    assert abs(float(torch.corrcoef(x)[0, 1])) < bound


def test_dare_rejects_bad_settings(zoo):
    _, _, store = zoo
    for settings, match in (({"p": 1.0}, r"\[0, 1\)"), ({"base": "mean"}, "base"), ({"merge": "max"}, "merge"),
                            ({"k": 120}, "percentage")):
        with pytest.raises(ValueError, match=match):
            vector("dare", store, **settings)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_dare_masks_are_the_same_on_cuda(zoo):
    _, _, store = zoo
    span = slice(5, 5 + 100_003)
    assert torch.equal(dare.survivors(2, store.tasks, "k", span, 0.5, "cuda").cpu(),
                       dare.survivors(2, store.tasks, "k", span, 0.5))
    spec = registry.method("dare")
    on = {d: flat(spec.run(Inputs({}, store.tasks, store, device=d), spec.configure({"base": "ties"})).vector(),
                  store) for d in ("cpu", "cuda")}
    torch.testing.assert_close(on["cuda"], on["cpu"], rtol=1e-6, atol=0)
