"""TALL masks against the paper's formula in float64, streamed equal at any chunking and budget,
and the Consensus reducer's masking (its methods' own tests: test_consensus_ta/ties.py)."""
import pytest
import torch
from helpers.merging import dense_tvs, routed_states, unflatten
from helpers.store import SHAPES, make_store, task_vectors

from pipeline.merging.tall_masks import columns


def dense_tall(tvs: torch.Tensor, mask_lambda: float) -> tuple[torch.Tensor, torch.Tensor]:
    """tau_MTL = sum_t tau_t, m_t = |tau_t| >= lambda |tau_MTL - tau_t| (float64)."""
    tvs = tvs.double()
    mtl = tvs.sum(0)
    return mtl, tvs.abs() >= mask_lambda * (mtl - tvs).abs()


@pytest.mark.parametrize("mask_lambda", [0.2, 0.6, 1.0])
def test_tall_masks_match_the_formula(zoo, tmp_path, mask_lambda):
    pre, fts, store = zoo
    mtl, masks = dense_tall(dense_tvs(pre, fts), mask_lambda)
    states, summary = routed_states("tall_masks", pre, store, tmp_path / "tall.safetensors", mask_lambda=mask_lambda)
    for state, mask in zip(states, masks):  # theta_pre + m_t * tau_MTL, unscaled
        expected = unflatten(pre, torch.where(mask, mtl, 0.0).float(), 1.0)
        assert state.keys() == expected.keys()
        for key in state:
            torch.testing.assert_close(state[key].float(), expected[key].float(), rtol=1e-6, atol=1e-6)
    assert 0.1 < masks.double().mean() < 0.95
    raw = (tmp_path / "tall.safetensors").read_bytes()
    data = len(raw) - 8 - int.from_bytes(raw[:8], "little")  # the tensors, without the header
    sizes = [pre[k].numel() for k in store.keys]
    assert data == sum(4 * n + 4 * -(-n // 8) for n in sizes) + 4 * 4  # tau_MTL, 4 bit masks, 4 scales
    storage = summary["storage"]
    assert storage["bytes"] == len(raw) and storage["full_models_bytes"] == 4 * sum(
        v.numel() * v.element_size() for v in pre.values())


def test_tall_masks_are_the_same_at_any_chunking_and_budget(tmp_path):
    """Tensors of 7, 165, 195, 486 and 675 entries in chunks of 5, 37 and 1000 (bits carried
    across chunk ends that are no multiple of 8) and budgets of 1 and 16 blocks."""
    values = task_vectors(k=3, seed=4)
    files = []
    for chunk, budget in ((5, 2 * 5 * 3 * 4 / 2**20), (37, 1.0), (1000, 64.0)):
        store = make_store(tmp_path / f"c{chunk}", values, chunk_elems=chunk)
        pre = {k: torch.zeros(s) for k, s in SHAPES.items()}
        states, _ = routed_states("tall_masks", pre, store, tmp_path / f"{chunk}.safetensors", budget_mib=budget)
        files.append(states)
    for states in files[1:]:
        for got, want in zip(states, files[0]):
            assert all(torch.equal(got[k], want[k]) for k in want)
    mtl, masks = dense_tall(values, 0.6)
    got = torch.cat([files[0][1][k].reshape(-1) for k in SHAPES])
    torch.testing.assert_close(got.double(), torch.where(masks[1], mtl, 0.0), rtol=1e-6, atol=1e-7)


def test_columns_reads_the_entries_asked_for(tmp_path):
    values = task_vectors(k=3, seed=2)
    store = make_store(tmp_path / "s", values, chunk_elems=37)
    index = torch.tensor([0, 36, 37, 400, 674])
    offset = sum(torch.Size(s).numel() for k, s in SHAPES.items() if k in ("conv.weight", "ln.bias"))
    assert torch.equal(columns(store, "attn.in_proj_weight", index), values[:, offset + index])

