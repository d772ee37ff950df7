"""Consensus Task Arithmetic against the paper's formula in float64, its limits (k = 0: Task
Arithmetic; k = 1: TA over the entries some task's mask holds; k > K: zero) and streaming."""
import pytest
import torch
from helpers.merging import assert_state_close, dense_consensus, dense_tvs, flat, merged, unflatten, vector
from helpers.store import make_store, task_vectors


@pytest.mark.parametrize("agree", [1, 2, 3])
@pytest.mark.parametrize("mask_lambda", [0.4, 0.6])
def test_consensus_ta_matches_dense(zoo, agree, mask_lambda):
    pre, fts, store = zoo
    tvs = dense_tvs(pre, fts)
    expected = dense_consensus(tvs, tvs.sum(0), agree, mask_lambda)
    got = flat(vector("consensus_ta", store, agree=agree, mask_lambda=mask_lambda), store)
    torch.testing.assert_close(got.double(), expected, rtol=1e-6, atol=1e-7)
    assert bool(got.any()) and (agree == 1 or bool((got == 0).any()))
    assert_state_close(merged("consensus_ta", pre, store, agree=agree, mask_lambda=mask_lambda, lam=0.5),
                       unflatten(pre, 0.5 * expected.float(), 1.0))


def test_consensus_limits(zoo):
    pre, fts, store = zoo
    tvs = dense_tvs(pre, fts).double()
    ta = flat(vector("task_arithmetic", store), store)
    assert torch.equal(flat(vector("consensus_ta", store, agree=0), store), ta)
    on_any = (tvs.abs() >= 0.6 * (tvs.sum(0) - tvs).abs()).any(0)
    assert not bool(on_any.all())  # some entries no mask holds ("catastrophic")
    assert torch.equal(flat(vector("consensus_ta", store, agree=1), store), torch.where(on_any, ta, 0.0))
    assert not bool(flat(vector("consensus_ta", store, agree=5), store).any())


def test_consensus_ta_is_the_same_at_any_chunking(tmp_path):
    values = task_vectors(k=4, seed=8)
    got = [flat(vector("consensus_ta", store, budget_mib=budget), store)
           for store, budget in ((make_store(tmp_path / "a", values, chunk_elems=9), 2 * 9 * 4 * 4 / 2**20),
                                 (make_store(tmp_path / "b", values, chunk_elems=400), 64.0))]
    assert torch.equal(got[0], got[1])
    torch.testing.assert_close(got[0].double(), dense_consensus(values, values.sum(0), 2, 0.6), rtol=1e-6, atol=1e-7)


def test_consensus_ta_rejects_bad_settings(zoo):
    _, _, store = zoo
    with pytest.raises(ValueError, match="agree >= 0"):
        vector("consensus_ta", store, agree=-1)
