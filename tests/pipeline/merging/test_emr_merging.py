"""EMR-Merging against the paper's Eq. 2-5 in float64, the L1 mass of each task's modulated
vector, streamed equal at any chunking and budget, and the stored size."""
import torch
from helpers.merging import dense_tvs, routed_states, unflatten
from helpers.store import SHAPES, make_store, task_vectors


def dense_emr(tvs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """tau_uni, the masks M_t and the rescalers lambda_t (float64)."""
    tvs = tvs.double()
    sign = torch.sign(tvs.sum(0))
    agree = tvs * sign > 0
    unified = sign * torch.where(agree, tvs.abs(), 0.0).max(0).values
    masks = tvs * unified > 0
    scales = tvs.abs().sum(1) / (masks * unified.abs()).sum(1)
    return unified, masks, scales


def modulated(states: list[dict], pre: dict, keys: list[str]) -> torch.Tensor:
    """(K, d) each task's encoder minus the pretrained one."""
    return torch.stack([torch.cat([(s[k].double() - pre[k].double()).reshape(-1) for k in keys]) for s in states])


def test_emr_matches_the_paper(zoo, tmp_path):
    pre, fts, store = zoo
    tvs = dense_tvs(pre, fts)
    unified, masks, scales = dense_emr(tvs)
    states, summary = routed_states("emr_merging", pre, store, tmp_path / "emr.safetensors")
    for state, mask, scale in zip(states, masks, scales):
        expected = unflatten(pre, (scale * torch.where(mask, unified, 0.0)).float(), 1.0)
        for key in state:
            torch.testing.assert_close(state[key].float(), expected[key].float(), rtol=1e-5, atol=1e-5)
    assert bool((masks.sum(0) < 4).any()) and bool(((scales - 1).abs() > 0.05).all())  # masks and rescalers matter
    assert summary["storage"]["full_models_bytes"] == 4 * sum(v.numel() * v.element_size() for v in pre.values())


def test_each_modulated_vector_has_its_task_vectors_l1_mass(tmp_path):
    """sum |lambda_t M_t tau_uni| = sum |tau_t| (Eq. 5), and it agrees in sign with tau_t."""
    values = task_vectors(k=5, seed=6)
    store = make_store(tmp_path / "s", values, chunk_elems=37)
    pre = {k: torch.zeros(s) for k, s in SHAPES.items()}
    states, _ = routed_states("emr_merging", pre, store, tmp_path / "emr.safetensors")
    got = modulated(states, pre, list(SHAPES))
    torch.testing.assert_close(got.abs().sum(1), values.double().abs().sum(1), rtol=1e-6, atol=0)
    assert bool((got * values >= 0).all())


def test_emr_is_the_same_at_any_chunking_and_budget(tmp_path):
    values = task_vectors(k=3, seed=9)
    pre = {k: torch.zeros(s) for k, s in SHAPES.items()}
    results = []
    for chunk, budget in ((5, 2 * 5 * 3 * 4 / 2**20), (37, 1.0), (37, 64.0), (1000, 64.0)):
        store = make_store(tmp_path / f"c{chunk}-{budget}", values, chunk_elems=chunk)
        states, _ = routed_states("emr_merging", pre, store, tmp_path / f"{chunk}-{budget}.safetensors",
                                  budget_mib=budget)
        results.append(modulated(states, pre, list(SHAPES)))
    assert torch.equal(results[1], results[2])  # the budget changes nothing
    for other in results[::3]:  # other chunkings: the rescalers' float64 sums in another order
        torch.testing.assert_close(other, results[1], rtol=1e-6, atol=0)
    unified, masks, scales = dense_emr(values)
    torch.testing.assert_close(results[0], scales[:, None] * torch.where(masks, unified, 0.0), rtol=1e-6, atol=1e-7)
