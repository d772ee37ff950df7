"""Task Arithmetic against the sum of task vectors written in dense torch."""
import pytest
from helpers.merging import assert_state_close, dense_tvs, merged, unflatten


@pytest.mark.parametrize("lam", [0.3, 1.0])
def test_task_arithmetic_exact(zoo, lam):
    pre, fts, store = zoo
    assert_state_close(merged("task_arithmetic", pre, store, lam=lam), unflatten(pre, dense_tvs(pre, fts).sum(0), lam),
                       exact=True)
