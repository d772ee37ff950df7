"""Triton TIES (radix select + fused merge) vs its torch twin and the reference semantics."""
import importlib

import pytest
import torch

from kernels import ties_apply, ties_merge, ties_stats, ties_thresholds

tm = importlib.import_module("kernels.ties_merge")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
_INT_VIEW = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


def _data(kind: str, n_tasks: int, n: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if kind == "randn":
        x = torch.randn(n_tasks, n, generator=g)
    elif kind == "ties":  # few levels: ties at the threshold, zeros, exact sign cancellations
        x = torch.randint(-3, 4, (n_tasks, n), generator=g) * 0.5
    elif kind == "equal_magnitude":
        x = torch.randint(0, 2, (n_tasks, n), generator=g) * 2.0 - 1.0
    elif kind == "low_bits":  # magnitudes differing only in the last mantissa bits, and tiny
        one = 0x3F800000  # bit pattern of 1.0
        x = torch.randint(one, one + 600, (n_tasks, n), generator=g, dtype=torch.int32).view(torch.float32)
        x = x * torch.where(torch.rand(n_tasks, n, generator=g) < 0.5, -1.0, 1.0)
        tiny = torch.randint(0, 50, (n_tasks, len(range(0, n, 7))), generator=g, dtype=torch.int32)
        x[:, ::7] = tiny.view(torch.float32)  # zeros and subnormals
    else:
        raise ValueError(kind)
    return x.to(dtype)


def _reference_ties(tvs: torch.Tensor, k: float, merge: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference code's computation (fp32, n_keep >= 1; n_keep = d keeps all)."""
    d = tvs.shape[1]
    kth = tvs.abs().kthvalue(max(d - int(d * (k / 100)), 1), dim=1, keepdim=True).values
    trimmed = tvs * (tvs.abs() >= kth)
    sign = torch.sign(trimmed.sum(dim=0))
    sign[sign == 0] = torch.sign(sign.sum())
    agree = torch.where(sign[None] > 0, trimmed > 0, trimmed < 0)
    selected = trimmed * agree
    merged = selected.sum(dim=0)
    if merge == "mean":
        merged = merged / torch.clamp((selected != 0).sum(dim=0).float(), min=1)
    return merged, selected


def _bits(x: torch.Tensor) -> torch.Tensor:
    return x.view(_INT_VIEW[x.dtype])


@pytest.mark.parametrize("k", [0, 20, 50, 100])
@pytest.mark.parametrize("kind", ["randn", "ties", "equal_magnitude", "low_bits"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_bit_identical_to_twin(dtype, kind, k, device):
    tvs = _data(kind, 4, 3001, dtype).to(device)
    for merge in ("mean", "sum"):
        out, parts = ties_merge(tvs, k, merge, return_parts=True, backend="triton")
        ref_out, ref_parts = ties_merge(tvs, k, merge, return_parts=True, backend="torch")
        assert out.dtype == torch.float32 and parts.dtype == dtype
        assert torch.equal(_bits(out), _bits(ref_out)), merge
        assert torch.equal(_bits(parts), _bits(ref_parts)), merge


@pytest.mark.parametrize("k", [1, 20, 50, 99, 100])
@pytest.mark.parametrize("kind", ["randn", "ties", "low_bits"])
def test_matches_reference_code(kind, k, device):
    """Masks, signs and parts exactly; sums exactly where fp32 addition is exact ("ties").

    torch.sum(dim=0) in the reference code adds in an unspecified, device-dependent order;
    the twin and the kernel add tasks sequentially, so sums may differ by rounding.
    """
    tvs = _data(kind, 5, 2001, torch.float32, seed=k).to(device)
    for merge in ("mean", "sum"):
        ref_out, ref_parts = _reference_ties(tvs, k, merge)
        for backend in ("torch", "triton"):
            out, parts = ties_merge(tvs, k, merge, return_parts=True, backend=backend)
            assert torch.equal(parts, ref_parts), (merge, backend)
            if kind == "ties":
                assert torch.equal(out, ref_out), (merge, backend)
            else:
                torch.testing.assert_close(out, ref_out, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("k, extra", [(20, 1), (20, 700), (20, 5000), (60, 5000), (0, 300)])
def test_extra_zeros_trim_like_the_reference_code_on_zero_padded_vectors(k, extra, device):
    """The AdaMerging code flattens text-side tensors whose task vectors are zero: counting
    ``extra`` zeros equals appending them (60% of 7001 keeps more than the 2001 entries: all)."""
    tvs = _data("ties", 4, 2001, torch.float32, seed=extra).to(device)
    padded = torch.cat([tvs, tvs.new_zeros(4, extra)], dim=1)
    for merge in ("mean", "sum"):
        ref_out, ref_parts = _reference_ties(padded, k, merge)
        assert not ref_parts[:, 2001:].any()
        for backend in ("torch", "triton"):
            out, parts = ties_merge(tvs, k, merge, return_parts=True, backend=backend, extra=extra)
            assert torch.equal(parts, ref_parts[:, :2001]), (merge, backend)
            assert torch.equal(out, ref_out[:2001]), (merge, backend)  # "ties" sums are exact in fp32
    assert not ties_thresholds(tvs, 60, extra=5000).any()  # keep everything
    with pytest.raises(ValueError, match="extra"):
        ties_thresholds(tvs, 20, extra=-1)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_thresholds_exact_and_edges(dtype, device):
    tvs = _data("low_bits", 3, 2500, dtype, seed=3).to(device)
    mags = tvs.float().abs()
    d = tvs.shape[1]
    # (k, floor(d * k / 100)) for d = 2500
    for k, keep in [(0.01, 0), (0.05, 1), (1, 25), (12.5, 312), (20, 500), (80, 2000), (99.99, 2499)]:
        got = ties_thresholds(tvs, k, backend="triton")
        assert torch.equal(got, ties_thresholds(tvs, k, backend="torch"))
        assert torch.equal(got, mags.kthvalue(d - keep, dim=1).values), k  # keep == 0: the maximum
    assert torch.equal(ties_thresholds(tvs, 100, backend="triton"), torch.zeros(3, device=device))


def test_keep_nothing_keeps_the_maximum(device):
    tvs = torch.tensor([[1.0, -3.0, 3.0, 2.0], [0.5, 0.25, -0.5, 0.5]], device=device)
    for backend in ("triton", "torch"):
        out, parts = ties_merge(tvs, 0, "sum", return_parts=True, backend=backend)
        # task 0 keeps -3 and 3, task 1 keeps 0.5, -0.5, 0.5; elected signs: +, -, + (3 - 0.5), +
        assert parts.tolist() == [[0.0, -3.0, 3.0, 0.0], [0.5, 0.0, 0.0, 0.5]], backend
        assert out.tolist() == [0.5, -3.0, 3.0, 0.5], backend


def test_histogram_over_many_programs(device, monkeypatch):
    monkeypatch.setattr(tm, "HIST_BLOCK", 128)  # 12 histogram programs per task, one atomic flush each
    monkeypatch.setattr(tm, "HIST_ITERS", 2)
    tvs = _data("randn", 3, 3001, torch.float32, seed=4).to(device)
    for k in (5, 20, 73):
        assert torch.equal(ties_thresholds(tvs, k, backend="triton"), ties_thresholds(tvs, k, backend="torch"))


@pytest.mark.parametrize("majority", [1, -1])
def test_zero_elected_sign_takes_majority(majority, device):
    # columns 0-2 cancel exactly (elected sign 0); the rest set the majority sign
    tvs = torch.tensor([[2.0, -1.0, 3.0] + [majority * 1.0] * 5 + [-majority * 1.0] * 2,
                        [-2.0, 1.0, -3.0] + [majority * 1.0] * 5 + [-majority * 1.0] * 2], device=device)
    out, parts = ties_merge(tvs, 100, "mean", return_parts=True, backend="triton")
    for ref_out, ref_parts in (ties_merge(tvs, 100, "mean", return_parts=True, backend="torch"),
                               _reference_ties(tvs, 100, "mean")):
        assert torch.equal(out, ref_out) and torch.equal(parts, ref_parts)
    expected = [2.0, 1.0, 3.0] if majority > 0 else [-2.0, -1.0, -3.0]
    assert out[:3].tolist() == expected
    assert ties_stats(tvs, 100, backend="triton").majority.item() == majority


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_streaming_chunks(dtype, device):
    tvs = _data("ties", 3, 4001, dtype, seed=5).to(device)
    widths = [1000, 1, 1024, 1976]
    bounds = torch.tensor([0] + widths).cumsum(0).tolist()

    def chunks():
        return (tvs[:, a:b] for a, b in zip(bounds, bounds[1:]))

    expected = ties_merge(tvs, 20, "mean", return_parts=True, backend="torch")
    for backend in ("triton", "torch"):
        out, parts = ties_merge(chunks, 20, "mean", return_parts=True, backend=backend)
        assert torch.equal(_bits(out), _bits(expected[0])) and torch.equal(_bits(parts), _bits(expected[1]))
        stats = ties_stats(chunks, 20, backend=backend)
        streamed = torch.cat([ties_apply(c, stats, "mean", backend=backend) for c in chunks()])
        assert torch.equal(_bits(streamed), _bits(expected[0]))


def test_argument_checks(device):
    tvs = torch.randn(2, 10, device=device)
    with pytest.raises(ValueError):
        ties_merge(tvs, 101, backend="triton")
    with pytest.raises(ValueError):
        ties_merge(tvs, 20, "max", backend="triton")
    with pytest.raises(ValueError):
        ties_merge(tvs.t(), 20, backend="triton")
