"""TSV-M against the paper's formula written directly in float64, its decorrelated bases, and
whole-tensor streaming against the method applied in memory."""
import pytest
import torch
from helpers.merging import vector, polar64, task_stacks
from safetensors.torch import load_file

from pipeline.merging import registry
from pipeline.merging.contract import Inputs
from pipeline.merging.tsv_merging import bases, tsv_merge


def tsv_reference(tvs: torch.Tensor) -> torch.Tensor:
    """TSV-M in float64, task by task: each task's top min(m, n) // K singular triplets,
    U and V concatenated and orthogonalised as U (U^T U)^-1/2, sum U_perp S V_perp^T."""
    k, m, n = tvs.shape
    r = min(m, n) // k
    us, ss, vs = [], [], []
    for t in tvs.double():
        u, s, vh = torch.linalg.svd(t)
        us.append(u[:, :r])
        ss.append(s[:r])
        vs.append(vh[:r].T)
    u, v = polar64(torch.cat(us, 1)), polar64(torch.cat(vs, 1))
    return u @ torch.diag(torch.cat(ss)) @ v.T


def test_tsv_matches_the_formula_in_float64(zoo):
    """Matrices (24 x 8 and 5 x 13, K = 4: r = 2 and 1) follow the formula; the other tensors
    (4-D conv, bias) are the mean of the task vectors. Tolerance: fp32 SVDs against float64,
    rtol 1e-4 / atol 1e-5 on entries of about 0.1."""
    pre, fts, store = zoo
    stacks = task_stacks(pre, fts)
    got = vector("tsv_merging", store)
    assert sorted(got) == sorted(stacks)
    for key, tvs in stacks.items():
        expected = tsv_reference(tvs) if tvs.dim() == 3 else tvs.double().mean(0)
        torch.testing.assert_close(got[key].double(), expected, rtol=1e-4, atol=1e-5, msg=key)


def test_the_concatenated_bases_are_orthonormal():
    """After decorrelation U_perp^T U_perp = I and V_perp V_perp^T = I (they are not before:
    random tasks' singular vectors overlap), and S holds each task's top r singular values."""
    tvs = torch.randn(3, 40, 25, generator=torch.Generator().manual_seed(0))
    u, s, vh = bases(tvs)
    r = 25 // 3
    assert u.shape == (40, 3 * r) and vh.shape == (3 * r, 25)
    eye = torch.eye(3 * r)
    torch.testing.assert_close(u.T @ u, eye, atol=1e-5, rtol=0)
    torch.testing.assert_close(vh @ vh.T, eye, atol=1e-5, rtol=0)
    raw = torch.cat([torch.linalg.svd(t)[0][:, :r] for t in tvs], 1)
    assert (raw.T @ raw - eye).abs().max() > 0.1  # the decorrelation did something
    torch.testing.assert_close(s, torch.linalg.svdvals(tvs)[:, :r].reshape(-1))


def test_too_many_tasks_for_a_matrix_keep_nothing():
    """K above min(m, n): r = 0, a zero update (as in FusionBench), not an error."""
    assert torch.equal(tsv_merge(torch.randn(6, 5, 9)), torch.zeros(5, 9))


@pytest.mark.parametrize("alpha", [1.0, 0.7])
def test_streamed_file_equals_the_method_in_memory(zoo, tmp_path, caplog, alpha):
    """The file written tensor by tensor (budget below one tensor's K task vectors: read whole
    all the same, with a warning) equals state_dict() and pretrained + alpha * TSV-M applied to
    the dense tensors in memory, bit for bit."""
    pre, fts, store = zoo
    spec = registry.method("tsv_merging")
    merge = spec.run(Inputs(pre, store.tasks, store, budget_mib=1 / 1024), spec.configure(alpha=alpha))
    merge.save(tmp_path / "m.safetensors")
    assert "read whole all the same" in caplog.text
    written, in_memory = load_file(tmp_path / "m.safetensors"), merge.state_dict()
    for key, tvs in task_stacks(pre, fts).items():
        update = tsv_merge(tvs) if tvs.dim() == 3 else tvs.mean(0)
        expected = (pre[key].float() + alpha * update).to(pre[key].dtype)
        assert torch.equal(written[key], expected) and torch.equal(in_memory[key], expected), key
    assert torch.equal(written["ids"], pre["ids"])


def test_svd_falls_back_to_float64_when_lapack_does_not_converge(monkeypatch):
    """gesdd's convergence failure (seen on Iso-CTS's projected ViT-B/32 matrices) is retried in
    float64: the factors come back in the input's dtype and reconstruct it."""
    import torch

    from pipeline.merging import tsv_merging

    real = torch.linalg.svd

    def gesdd_fails_on_float32(x, full_matrices=True):
        if x.dtype == torch.float32:
            raise torch.linalg.LinAlgError("linalg.svd: The algorithm failed to converge")
        return real(x, full_matrices=full_matrices)

    monkeypatch.setattr(torch.linalg, "svd", gesdd_fails_on_float32)
    x = torch.randn(2, 6, 4, generator=torch.Generator().manual_seed(0))
    u, s, vh = tsv_merging.svd(x)
    assert u.dtype == s.dtype == vh.dtype == torch.float32 and u.shape == (2, 6, 4)
    assert torch.allclose(u @ torch.diag_embed(s) @ vh, x, atol=1e-5)
