"""Triton weighted sum vs its torch twin: forward, lambda gradient, determinism, gradcheck."""
import importlib
from itertools import pairwise

import pytest
import torch

from kernels import weighted_sum

ws = importlib.import_module("kernels.weighted_sum")

# Tolerances (rtol, atol) of Triton vs the torch twin, per task-vector dtype. Both convert
# the task vectors exactly to fp32 and accumulate in fp32, so the dtypes share tolerances:
# the forward differs by FMA contraction (a few ulp), the gradient by summation order over
# segments of up to ~5k products of O(1) values.
TOL = {
    torch.float32: {"fwd": (1e-5, 1e-5), "grad": (1e-4, 1e-3)},
    torch.bfloat16: {"fwd": (1e-5, 1e-5), "grad": (1e-4, 1e-3)},
    torch.float16: {"fwd": (1e-5, 1e-5), "grad": (1e-4, 1e-3)},
}

LAYOUTS = {
    # one-element, empty and block-size-straddling segments (BLOCK = 1024)
    "layer_wise": [0, 1, 1001, 1002, 2026, 2026, 4099, 4100],
    "task_wise": [0, 3000],
    "aligned": [0, 16, 784, 2064, 4112],  # multiples of 16: the kernels' aligned variant
}


def _inputs(offsets, n_tasks, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = offsets[-1]
    base = torch.randn(n, generator=g).to(device)
    tvs = torch.randn(n_tasks, n, generator=g).to(device=device, dtype=dtype)
    lambdas = torch.rand(n_tasks, len(offsets) - 1, generator=g).to(device).requires_grad_()
    grad_out = torch.randn(n, generator=g).to(device)
    return base, tvs, lambdas, grad_out


def _run(backend, base, tvs, lambdas, offsets, grad_out):
    lambdas.grad = None
    out = weighted_sum(base, tvs, lambdas, offsets, backend=backend)
    out.backward(grad_out)
    return out.detach(), lambdas.grad.clone()


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("dtype", list(TOL), ids=str)
def test_matches_twin(layout, dtype, device):
    offsets = LAYOUTS[layout]
    base, tvs, lambdas, grad_out = _inputs(offsets, 3, dtype, device)
    out, grad = _run("triton", base, tvs, lambdas, offsets, grad_out)
    ref_out, ref_grad = _run("torch", base, tvs, lambdas, offsets, grad_out)
    assert out.dtype == torch.float32 and grad.shape == lambdas.shape
    rtol, atol = TOL[dtype]["fwd"]
    torch.testing.assert_close(out, ref_out, rtol=rtol, atol=atol)
    rtol, atol = TOL[dtype]["grad"]
    torch.testing.assert_close(grad, ref_grad, rtol=rtol, atol=atol)
    if layout == "layer_wise":
        assert torch.all(grad[:, 4] == 0)  # empty segment


def test_gradient_deterministic_and_multi_step_reduce(device, monkeypatch):
    monkeypatch.setattr(ws, "RBLOCK", 2)  # several reduction steps per segment
    offsets = LAYOUTS["layer_wise"]
    base, tvs, lambdas, grad_out = _inputs(offsets, 5, torch.float32, device, seed=1)
    _, grad_a = _run("triton", base, tvs, lambdas, offsets, grad_out)
    _, grad_b = _run("triton", base, tvs, lambdas, offsets, grad_out)
    _, ref = _run("torch", base, tvs, lambdas, offsets, grad_out)
    assert torch.equal(grad_a, grad_b)
    torch.testing.assert_close(grad_a, ref, rtol=1e-4, atol=1e-3)


def test_offsets_as_tensor_and_no_grad_to_constants(device):
    offsets = LAYOUTS["task_wise"]
    base, tvs, lambdas, _ = _inputs(offsets, 2, torch.float32, device)
    out = weighted_sum(base, tvs, lambdas, torch.tensor(offsets), backend="triton")
    torch.testing.assert_close(out, weighted_sum(base, tvs, lambdas, offsets, backend="torch"))
    with pytest.raises(ValueError):
        weighted_sum(base, tvs.clone().requires_grad_(), lambdas, offsets, backend="triton")
    with pytest.raises(ValueError):
        weighted_sum(base, tvs, lambdas, [0, 5, 4, 3000], backend="triton")


def test_gradcheck_twin_float64():
    offsets = [0, 1, 7, 8, 20]
    g = torch.Generator().manual_seed(2)
    base = torch.randn(20, generator=g, dtype=torch.float64)
    tvs = torch.randn(3, 20, generator=g, dtype=torch.float64)
    lambdas = torch.rand(3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda lam: weighted_sum(base, tvs, lam, offsets, backend="torch"), (lambdas,))


@pytest.mark.parametrize("dtype", list(TOL), ids=str)
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_segments_match_flat_twin(layout, backend, dtype, device):
    """One tensor per segment (the CPU's per-segment Function, or views of Triton's output):
    same values and lambda gradient as the flat twin, for fp32 and half-precision task
    vectors; a segment without gradient gets zeros."""
    offsets = LAYOUTS[layout]
    base, tvs, lambdas, grad_out = _inputs(offsets, 3, dtype, device, seed=3)
    parts = ws.weighted_sum_segments(base, tvs, lambdas, offsets, backend=backend)
    assert [p.numel() for p in parts] == [b - a for a, b in pairwise(offsets)]
    grads = list(grad_out.split([p.numel() for p in parts]))
    unused = 0 if len(parts) > 1 else None  # segment 0's output takes no part in the loss
    used = [i for i in range(len(parts)) if i != unused]
    torch.autograd.backward([parts[i] for i in used], [grads[i] for i in used])
    grad = lambdas.grad.clone()
    if unused is not None:
        grads[unused] = torch.zeros_like(grads[unused])
    ref_out, ref_grad = _run("torch", base, tvs, lambdas, offsets, torch.cat(grads))
    assert all(p.dtype == torch.float32 for p in parts) and grad.dtype == torch.float32
    torch.testing.assert_close(torch.cat([p.detach() for p in parts]), ref_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=1e-3)
    nonempty = [i for i in used if parts[i].numel()]
    assert torch.all(grad[:, nonempty] != 0)
    if unused is not None:
        assert torch.all(grad[:, unused] == 0)


def test_segments_gradcheck_float64_and_constants():
    offsets = [0, 1, 7, 7, 8, 20]
    g = torch.Generator().manual_seed(4)
    base = torch.randn(20, generator=g, dtype=torch.float64)
    tvs = torch.randn(3, 20, generator=g, dtype=torch.float64)
    lambdas = torch.rand(3, 5, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda lam: ws.weighted_sum_segments(base, tvs, lam, offsets, backend="torch"), (lambdas,))
    with pytest.raises(ValueError, match="lambdas only"):
        ws.weighted_sum_segments(base.requires_grad_(), tvs, lambdas, offsets, backend="torch")
