"""TIES-Merging against a plain dense torch implementation (tests/helpers/merging.py)."""
import pytest
import torch
from helpers.merging import TASKS, assert_state_close, dense_ties, dense_tvs, make_store, merged, unflatten, vector
from helpers.store import encoder_state


@pytest.mark.parametrize("merge", ["mean", "sum"])
@pytest.mark.parametrize("k", [10, 20, 100])
def test_ties_matches_dense(zoo, k, merge):
    pre, fts, store = zoo
    expected = unflatten(pre, dense_ties(dense_tvs(pre, fts), k, merge), 0.3)
    assert_state_close(merged("ties_merging", pre, store, k=k, merge=merge, lam=0.3), expected)


@pytest.mark.parametrize("merge", ["mean", "sum"])
@pytest.mark.parametrize("k", [0, 10, 20, 50, 100])
def test_ties_keeps_exactly_with_ties_and_zero_signs(tmp_path, k, merge):
    """Few magnitude levels: many entries tie at the threshold, and +x/-x pairs elect sign 0."""
    pre = encoder_state()
    g = torch.Generator().manual_seed(k)
    fts, prev = {}, None
    for i, t in enumerate(TASKS):
        steps = {key: torch.randint(-2, 3, v.shape, generator=g) * 0.25 for key, v in pre.items()}
        if i % 2:  # task b cancels task a, task d cancels task c on the first tensor: zero elected signs
            steps["conv1.weight"] = -prev["conv1.weight"]
        prev = steps
        fts[t] = {key: (v.float() + steps[key]).to(v.dtype) if v.is_floating_point() else v for key, v in pre.items()}
    store = make_store(tmp_path, fts, pre)
    tvs = dense_tvs(pre, fts)
    expected = dense_ties(tvs, k, merge)
    got = vector("ties_merging", store, k=k, merge=merge)
    flat = torch.cat([got[key].reshape(-1) for key in store.keys])
    assert torch.equal(flat, expected)
    zero_sign = (tvs[0] == -tvs[1]) & (tvs[2] == -tvs[3])
    assert zero_sign.any()


def test_ties_rejects_bad_settings(zoo):
    _, _, store = zoo
    with pytest.raises(ValueError, match="mean"):
        vector("ties_merging", store, k=20, merge="max")
    with pytest.raises(ValueError, match="percentage"):
        vector("ties_merging", store, k=120, merge="mean")
