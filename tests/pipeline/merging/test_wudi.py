"""WUDI-Merging against Adam on the paper's loss written directly (autograd, float64), its loss
against Task Arithmetic's, and whole-tensor streaming against the method applied in memory."""
import pytest
import torch
from helpers.merging import make_store, merged, vector, task_stacks

from pipeline.merging.wudi import Settings, is_linear, loss, wudi

SHAPES = {"transformer.resblocks.0.attn.in_proj_weight": (12, 4),  # tall: B through the n x n Grams
          "transformer.resblocks.0.mlp.c_proj.weight": (4, 10),  # wide: B through the m x m ones
          "positional_embedding": (5, 4), "transformer.resblocks.0.ln_1.bias": (4,)}


@pytest.fixture
def blocks(tmp_path):
    """Pretrained weights of open_clip names and four tasks' fine-tuned copies, in a store."""
    g = torch.Generator().manual_seed(0)
    pre = {k: torch.randn(s, generator=g) for k, s in SHAPES.items()}
    fts = {t: {k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in pre.items()} for t in "abcd"}
    return pre, fts, make_store(tmp_path, fts, pre)


def adam_on_the_loss(tvs: torch.Tensor, steps: int, lr: float) -> torch.Tensor:
    """The paper's optimisation written directly, in float64: Adam from sum_k tau_k on
    sum_k ||(tau_m - tau_k) tau_k^T||_F^2 / ||tau_k||_F^2, gradients by autograd."""
    tvs = tvs.double()
    tau = tvs.sum(0).clone().requires_grad_()
    adam = torch.optim.Adam([tau], lr=lr)
    for _ in range(steps):
        objective = sum(((tau - t) @ t.T).square().sum() / t.square().sum() for t in tvs)
        adam.zero_grad()
        objective.backward()
        adam.step()
    return tau.detach()


def test_only_the_blocks_linear_weights_are_optimised():
    assert [k for k, s in SHAPES.items() if is_linear(k, s)] == list(SHAPES)[:2]
    assert not is_linear("proj", (768, 512)) and not is_linear("conv1.weight", (768, 3, 32, 32))


@pytest.mark.parametrize("steps, lr", [(40, 1e-3), (300, 1e-5)])
def test_wudi_matches_adam_on_the_loss_in_float64(blocks, steps, lr):
    """Linear layers follow autograd's Adam on the loss, the other tensors (a 2-D positional
    embedding, a bias) are the mean of the task vectors. Tolerance atol 5e-6: fp32 against
    float64, chiefly the rounding of 300 steps of 1e-5 added to entries up to 1 (ulp 6e-8)."""
    pre, fts, store = blocks
    got = vector("wudi", store, steps=steps, lr=lr)
    for key, tvs in task_stacks(pre, fts).items():
        expected = adam_on_the_loss(tvs, steps, lr) if is_linear(key, SHAPES[key]) else tvs.double().mean(0)
        torch.testing.assert_close(got[key].double(), expected, rtol=0, atol=5e-6, msg=key)
        if is_linear(key, SHAPES[key]):
            assert (got[key] - tvs.sum(0)).abs().max() > 0.5 * steps * lr  # it moved from the start


def test_the_loss_decreases_below_task_arithmetics():
    """On one layer the loss falls with the steps from its start, Task Arithmetic with lambda 1,
    to below half of it in the default 300 steps (entries of task-vector size, 1e-3; on these
    random task vectors 0.3 times the sum has a lower loss still: the steps of lr 1e-5 are
    not meant to reach the optimum)."""
    g = torch.Generator().manual_seed(4)
    tvs = torch.randn(8, 48, 16, generator=g) * 1e-3  # task-vector sized entries
    losses = [float(loss(wudi(tvs, steps, lr=1e-5), tvs)) for steps in (0, 10, 100, 300)]
    assert losses[0] == pytest.approx(float(loss(tvs.sum(0), tvs)))
    assert losses == sorted(losses, reverse=True) and losses[-1] < 0.5 * losses[0], losses


def test_a_zero_task_matrix_adds_nothing():
    """A task that left a layer frozen (zero task matrix) neither breaks the loss weights (0/0)
    nor changes the result of the others."""
    g = torch.Generator().manual_seed(5)
    tvs = torch.randn(3, 6, 4, generator=g)
    with_zero = torch.cat([tvs, torch.zeros(1, 6, 4)])
    torch.testing.assert_close(wudi(with_zero, 20, 1e-2), wudi(tvs, 20, 1e-2))


def test_settings_out_of_range_are_refused():
    with pytest.raises(ValueError, match="WUDI needs steps >= 0 and lr > 0, got steps=-1, lr=1e-05"):
        Settings(steps=-1)


def test_streamed_merge_equals_the_method_in_memory(blocks):
    """pretrained + WUDI applied to the dense tensors in memory, bit for bit."""
    pre, fts, store = blocks
    got = merged("wudi", pre, store, steps=20)
    for key, tvs in task_stacks(pre, fts).items():
        update = wudi(tvs, 20) if is_linear(key, SHAPES[key]) else tvs.mean(0)
        assert torch.equal(got[key], pre[key] + update), key
