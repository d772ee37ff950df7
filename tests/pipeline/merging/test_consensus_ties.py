"""Consensus TIES against the paper's formula in float64 (masks against the TIES-merged vector,
which the consensus mask then filters), including the exact sign cancellations that TIES
patches after its pass, and streaming at any chunking."""
import pytest
import torch
from helpers.merging import dense_consensus, dense_ties, dense_tvs, flat, vector
from helpers.store import make_store, task_vectors

from pipeline.merging.tall_masks import Consensus
from pipeline.merging.ties_merging import Ties
from pipeline.store.streaming import merge_to_memory


@pytest.mark.parametrize("merge", ["sum", "mean"])
@pytest.mark.parametrize("agree", [1, 2])
def test_consensus_ties_matches_dense(zoo, merge, agree):
    pre, fts, store = zoo
    tvs = dense_tvs(pre, fts).double()
    expected = dense_consensus(tvs, dense_ties(tvs, 20, merge), agree, 0.6)
    got = flat(vector("consensus_ties", store, merge=merge, agree=agree), store)
    torch.testing.assert_close(got.double(), expected, rtol=1e-6, atol=1e-7)
    ties = flat(vector("ties_merging", store, merge=merge), store)
    removed = bool(((got == 0) & (ties != 0)).any())  # k = 2 removes the entries only one task moves
    assert bool(got.any()) and removed == (agree == 2)


def test_consensus_ties_remasks_the_patched_cancellations(tmp_path):
    """Task vectors on few levels with a negative majority and exact +x/-x cancellations: TIES
    patches those entries after the pass, and consensus re-masks them from their task vectors."""
    values = task_vectors("levels", k=4, seed=5) - 0.5
    values[1, :300] = -values[0, :300]  # tasks a and b cancel, c and d too: elected sign 0
    values[3, :300] = -values[2, :300]
    store = make_store(tmp_path / "s", values, chunk_elems=37)
    expected = dense_consensus(values, dense_ties(values.double(), 50, "sum"), 1, 0.2)
    got = flat(vector("consensus_ties", store, k=50, agree=1, mask_lambda=0.2), store)
    assert torch.equal(got.double(), expected)
    reducer = Consensus(Ties(50, "sum"), 1, 0.2)
    merge_to_memory(store, reducer)
    patched = reducer.patches()
    assert sum(len(index) for _, index, _ in patched) > 100  # the negative majority was patched in
    assert any(bool(merged.any()) for _, _, merged in patched)
    again = flat(vector("consensus_ties", make_store(tmp_path / "t", values, chunk_elems=500), k=50, agree=1,
                        mask_lambda=0.2), store)
    assert torch.equal(again, got)

