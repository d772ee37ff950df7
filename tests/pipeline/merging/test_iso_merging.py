"""Iso-C and Iso-CTS against the paper's formulas written directly in float64, their flat
spectra, the task-specific subspaces' orthogonality to the common one, and whole-tensor
streaming against the methods applied in memory."""
import pytest
import torch
from helpers.merging import make_store, merged, vector, polar64, task_stacks

from pipeline.merging.iso_merging import IsoCTSSettings, iso_c, iso_cts, subspace_sizes, subspaces


def iso_c_reference(tvs: torch.Tensor) -> torch.Tensor:
    """Iso-C in float64: the sum M's nuclear norm / rank times its polar factor (= mean(S) U V^T)."""
    total = tvs.double().sum(0)
    return torch.linalg.matrix_norm(total, "nuc") / min(total.shape) * polar64(total)


def iso_cts_reference(tvs: torch.Tensor, fraction: float) -> torch.Tensor:
    """Iso-CTS in float64, written from the paper's algorithm: the sum's top c directions, each
    task's top s directions of (I - U_c U_c^T) tau_k, both bases orthogonalised together,
    every kept singular value replaced by their mean."""
    tvs = tvs.double()
    k, m, n = tvs.shape
    p = min(m, n)
    s_task = round((p - int(p * fraction)) / k)
    c = p - k * s_task
    u, s, vh = torch.linalg.svd(tvs.sum(0))
    us, ss, vs = [u[:, :c]], [s[:c]], [vh[:c].T]
    project_out = torch.eye(m, dtype=torch.float64) - u[:, :c] @ u[:, :c].T
    for t in tvs:
        ut, st, vht = torch.linalg.svd(project_out @ t)
        us.append(ut[:, :s_task])
        ss.append(st[:s_task])
        vs.append(vht[:s_task].T)
    return torch.cat(ss).mean() * polar64(torch.cat(us, 1)) @ polar64(torch.cat(vs, 1)).T


def test_iso_c_matches_the_formula_in_float64(zoo):
    """Matrices follow the formula, other tensors are the mean; rtol 1e-4 / atol 1e-5 (fp32
    SVD against float64 on entries of about 0.1)."""
    pre, fts, store = zoo
    got = vector("iso_c", store)
    for key, tvs in task_stacks(pre, fts).items():
        expected = iso_c_reference(tvs) if tvs.dim() == 3 else tvs.double().mean(0)
        torch.testing.assert_close(got[key].double(), expected, rtol=1e-4, atol=1e-5, msg=key)


@pytest.mark.parametrize("fraction", [0.5, 0.8])
def test_iso_cts_matches_the_algorithm_in_float64(tmp_path, fraction):
    """Matrices large enough for task-specific directions at both fractions (36 x 30 and
    20 x 44, K = 4; for the first c = 14, s = 4 at 0.5 and c = 22, s = 2 at 0.8), other
    tensors the mean; rtol 1e-4 / atol 1e-5."""
    g = torch.Generator().manual_seed(1)
    pre = {"a.weight": torch.randn(36, 30, generator=g), "b.weight": torch.randn(20, 44, generator=g),
           "a.bias": torch.randn(36, generator=g)}
    fts = {t: {k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in pre.items()} for t in "abcd"}
    store = make_store(tmp_path, fts, pre)
    got = vector("iso_cts", store, common_space_fraction=fraction)
    for key, tvs in task_stacks(pre, fts).items():
        expected = iso_cts_reference(tvs, fraction) if tvs.dim() == 3 else tvs.double().mean(0)
        torch.testing.assert_close(got[key].double(), expected, rtol=1e-4, atol=1e-5, msg=key)


@pytest.mark.parametrize("method", [iso_c, lambda tvs: iso_cts(tvs, 0.5)])
def test_the_merged_spectrum_is_flat(method):
    """Every singular value of the merged matrix equals their mean (per matrix), tall and wide."""
    g = torch.Generator().manual_seed(2)
    for shape in ((40, 24), (24, 40)):
        tvs = torch.randn(4, *shape, generator=g) * torch.logspace(0, -2, shape[1])  # a skewed spectrum
        values = torch.linalg.svdvals(method(tvs))
        torch.testing.assert_close(values, values.mean().expand(len(values)), rtol=1e-5, atol=0)
        assert torch.linalg.svdvals(tvs.sum(0)).std() > 0.1 * values.mean()  # the sum's spectrum was not


def test_task_specific_directions_are_orthogonal_to_the_common_subspace():
    """Each task's kept left directions U_t lie in the complement of U_c (|U_c^T U_t| ~ 0),
    and the sizes add up to the rank: c + K s = min(m, n)."""
    g = torch.Generator().manual_seed(3)
    tvs = torch.randn(4, 48, 32, generator=g)
    uc, sc, vhc, ut, st, vht = subspaces(tvs, 0.5)
    c, s = subspace_sizes(32, 4, 0.5)
    assert (c, s) == (16, 4) and uc.shape == (48, c) and ut.shape == (48, 4 * s) and vht.shape == (4 * s, 32)
    assert (uc.T @ ut).abs().max() < 1e-5
    raw = torch.linalg.svd(tvs)[0][:, :, :s].transpose(0, 1).reshape(48, -1)
    assert (uc.T @ raw).abs().max() > 0.1  # without the projection they are not


@pytest.mark.parametrize("p, k, fraction, sizes", [(768, 8, 0.8, (616, 19)), (50, 8, 0.8, (42, 1)),
                                                   (8, 4, 0.8, (8, 0)), (7, 4, 0.0, (3, 1))])
def test_subspace_sizes(p, k, fraction, sizes):
    """FusionBench's rounding (ViT-B/32's 768 and the 50-token positional embedding); where
    round() would ask for more task directions than the rank holds (7, K 4, fraction 0: 2
    each), they are cut to p // K."""
    assert subspace_sizes(p, k, fraction) == sizes


def test_fraction_out_of_range_is_refused():
    with pytest.raises(ValueError, match=r"common_space_fraction must be in \[0, 1\], got 1.5"):
        IsoCTSSettings(common_space_fraction=1.5)


@pytest.mark.parametrize("name, alpha", [("iso_c", 1.5), ("iso_cts", 0.9)])
def test_streamed_merge_equals_the_method_in_memory(zoo, name, alpha):
    """pretrained + alpha * the method applied to the dense tensors in memory, bit for bit."""
    pre, fts, store = zoo
    method = iso_c if name == "iso_c" else lambda tvs: iso_cts(tvs, 0.8)
    got = merged(name, pre, store, alpha=alpha)
    for key, tvs in task_stacks(pre, fts).items():
        update = method(tvs) if tvs.dim() == 3 else tvs.mean(0)
        assert torch.equal(got[key], (pre[key].float() + alpha * update).to(pre[key].dtype)), key
