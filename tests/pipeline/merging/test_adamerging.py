"""AdaMerging on the tiny synthetic ViT: the fused flat-vector path against a naive state-dict
rebuild, clamping, entropy descent, AdaMerging++ inputs and outputs."""

import itertools

import numpy as np
import pytest
import torch
from helpers.adamerging import K, perturbed_zoo
from torch.func import functional_call

from pipeline.functional import FlatLayout
from pipeline.merging import adamerging as am
from pipeline.merging import registry

# fp32: the fused and naive paths add the same products in different orders
GRAD_TOL = {"rtol": 1e-4, "atol": 1e-6}


@pytest.fixture(scope="module")
def zoo():
    return perturbed_zoo()


def _fused(zoo, layer_wise, raw):
    encoder, pre, finetuned, _, _ = zoo
    layout = FlatLayout.of(pre)
    base = layout.flatten(pre)
    model = am.FusedMerge(encoder, layout, base, am.task_vector_matrix(layout, base, finetuned),
                          layer_wise, init=0.3, clamp=(0.0, 1.0))
    with torch.no_grad():
        model.lambda_raw.copy_(raw)
    return model


def _naive_loss(zoo, lambda_raw, x, sizes):
    """Rebuild the merged state dict from pretrained + sum_k clamp(lambda) * tau_k."""
    encoder, pre, finetuned, heads, _ = zoo
    lam = lambda_raw.clamp(0, 1)
    params = {}
    for seg, name in enumerate(k for k, v in pre.items() if v.is_floating_point()):
        col = seg if lam.shape[1] > 1 else 0
        params[name] = pre[name] + sum(lam[k, col] * (finetuned[k][name] - pre[name]) for k in range(K))
    return am.entropy_loss(functional_call(encoder, params, (x,)), heads, sizes)


def _batch(zoo, seed=0):
    return am.draw_batches(zoo[4], 16, 2, torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("layer_wise", [False, True], ids=["task_wise", "layer_wise"])
def test_fused_gradient_matches_naive_rebuild(zoo, layer_wise):
    n_seg = len(FlatLayout.of(zoo[1]).names) if layer_wise else 1
    raw = torch.rand(K, n_seg, generator=torch.Generator().manual_seed(1)) * 0.8 + 0.1
    model = _fused(zoo, layer_wise, raw)
    x, sizes = _batch(zoo)
    loss = am.entropy_loss(model(x), zoo[3], sizes)
    loss.backward()
    naive_raw = raw.clone().requires_grad_()
    naive = _naive_loss(zoo, naive_raw, x, sizes)
    naive.backward()
    torch.testing.assert_close(loss, naive, rtol=1e-5, atol=1e-6)
    assert model.lambda_raw.grad.abs().max() > 0
    torch.testing.assert_close(model.lambda_raw.grad, naive_raw.grad, **GRAD_TOL)


def test_clamping_uses_bounds_and_blocks_gradient_outside(zoo):
    raw = torch.tensor([[-0.5], [1.5], [0.4]])
    model = _fused(zoo, False, raw)
    inside = _fused(zoo, False, raw.clamp(0, 1))
    torch.testing.assert_close(model.merged(), inside.merged(), rtol=0, atol=0)
    x, sizes = _batch(zoo)
    am.entropy_loss(model(x), zoo[3], sizes).backward()
    grad = model.lambda_raw.grad[:, 0]
    assert grad[0] == 0 and grad[1] == 0 and grad[2] != 0


def test_no_steps_is_task_arithmetic(zoo):
    encoder, pre, finetuned, heads, images = zoo
    result = am.adamerge("task_wise", encoder, finetuned, heads, images, am.Settings(steps=0), progress=False)
    expected = {k: v + 0.3 * sum(ft[k] - v for ft in finetuned) for k, v in pre.items()}  # task arithmetic
    assert result.state_dict.keys() == pre.keys() and result.entropy == []
    for k in pre:
        torch.testing.assert_close(result.state_dict[k], expected[k], rtol=1e-5, atol=1e-6)


def _ties_parts_reference(tvs, k):
    """TIES (the semantics of kernels.ties_merge) with kthvalue: trimmed, sign-elected, disjoint parts."""
    d = tvs.shape[1]
    kth = tvs.abs().kthvalue(d - int(d * k / 100), dim=1, keepdim=True).values
    trimmed = tvs * (tvs.abs() >= kth)
    sign = torch.sign(trimmed.sum(0))
    sign[sign == 0] = torch.sign(sign.sum())
    return trimmed * torch.where(sign > 0, trimmed > 0, trimmed < 0)


def test_plus_variants_merge_the_ties_parts(zoo):
    encoder, pre, finetuned, heads, images = zoo
    layout = FlatLayout.of(pre)
    base = layout.flatten(pre)
    parts = am.ties_parts(am.task_vector_matrix(layout, base, finetuned), 20)
    torch.testing.assert_close(parts, _ties_parts_reference(am.task_vector_matrix(layout, base, finetuned), 20),
                               rtol=0, atol=0)
    assert 0 < (parts != 0).float().mean() <= 0.2
    result = am.adamerge("layer_wise_plus", encoder, finetuned, heads, images, am.Settings(steps=0), progress=False)
    torch.testing.assert_close(layout.flatten(result.state_dict), base + 0.3 * parts.sum(0), rtol=1e-6, atol=1e-6)


def test_plus_variants_count_over_the_official_encoder(zoo):
    """ties_count_over official_encoder: the TIES parts of the task vectors padded with the
    official ImageEncoder's zero text-side entries (13,697 for the synthetic architecture)."""
    from pipeline.models.clip import official_encoder_extra

    encoder, pre, finetuned, heads, images = zoo
    layout = FlatLayout.of(pre)
    base = layout.flatten(pre)
    tvs = am.task_vector_matrix(layout, base, finetuned)
    extra = official_encoder_extra("synth-vit-tiny")
    parts = _ties_parts_reference(torch.cat([tvs, tvs.new_zeros(len(tvs), extra)], dim=1), 20)[:, :layout.numel]
    assert (parts != 0).sum() > (_ties_parts_reference(tvs, 20) != 0).sum()  # more than the visual count keeps
    settings = am.Settings(steps=0, ties_count_over="official_encoder")
    result = am.adamerge("task_wise_plus", encoder, finetuned, heads, images, settings, progress=False,
                         arch="synth-vit-tiny")
    torch.testing.assert_close(layout.flatten(result.state_dict), base + 0.3 * parts.sum(0), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="arch"):
        am.adamerge("task_wise_plus", encoder, finetuned, heads, images, settings, progress=False)
    with pytest.raises(ValueError, match="ties_count_over"):
        am.Settings(ties_count_over="text")


def test_entropy_decreases_and_tables(zoo):
    encoder, _, finetuned, heads, images = zoo
    # 2 batches of 8 out of 16 images per task: every step sees all, the loss is deterministic
    settings = am.Settings(steps=12, lr=2e-2, log_every=5, batch_size=8)
    images = [x[:16] for x in images]
    result = am.adamerge("layer_wise", encoder, finetuned, heads, images, settings, progress=False)
    e = result.entropy
    assert len(e) == 12 and e[-1] < e[0] - 1e-3
    assert all(b < a for a, b in itertools.pairwise(e))
    assert sorted(result.lambda_raw) == [0, 5, 10, 12]
    lam = am.lambda_table(result, ["a", "b", "c"])
    n_seg = len(result.layout.names)
    assert len(lam) == 4 * K * n_seg
    assert lam["value"].between(0, 1).all() and set(lam["step"]) == {0, 5, 10, 12}
    assert np.allclose(lam.loc[lam.step == 0, "value"], 0.3)
    assert lam["block"].dropna().astype(int).between(0, 3).all()
    ent = am.entropy_table(result)
    assert list(ent.columns) == ["variant", "step", "entropy"] and ent["step"].tolist() == list(range(12))
    # the merged weights are the final clamped coefficients' merge
    final = result.lambdas
    np.testing.assert_allclose(lam.loc[lam.step == 12, "value"], final.reshape(-1).numpy(), rtol=1e-7)


def test_task_vectors_as_input_and_bad_inputs(zoo):
    encoder, pre, finetuned, heads, images = zoo
    layout = FlatLayout.of(pre)
    base = layout.flatten(pre)
    tvs = am.task_vector_matrix(layout, base, finetuned)
    s = am.Settings(steps=2)
    a = am.adamerge("task_wise", encoder, finetuned, heads, images, s, progress=False)
    b = am.adamerge("task_wise", encoder, tvs, heads, images, s, progress=False)
    assert a.entropy == pytest.approx(b.entropy, rel=1e-6)
    with pytest.raises(ValueError, match="unknown AdaMerging variant"):
        am.adamerge("nope", encoder, finetuned, heads, images)
    with pytest.raises(ValueError, match="as many heads"):
        am.adamerge("task_wise", encoder, finetuned, heads[:2], images)
    spec = registry.method("adamerging_task_wise")
    with pytest.raises(ValueError, match=r"adamerging_task_wise: unknown settings \['learning_rate'\]"):
        spec.configure({"learning_rate": 1})
    assert spec.configure({"betas": [0.5, 0.9]}).betas == (0.5, 0.9)


def test_images_read_from_a_cache_give_the_same_run_as_tensors(zoo, tmp_path):
    from helpers.images import SHAPES, Items, pil_images

    from pipeline.data.image_cache import DecodedImages, UnlabeledImages, decode_split

    encoder, _, finetuned, heads, _ = zoo
    decode_split(Items(pil_images(SHAPES * 4)), 32, tmp_path / "c", threads=2)
    cache = DecodedImages(tmp_path / "c")
    rows = [torch.randperm(len(cache), generator=torch.Generator().manual_seed(k))[:20] for k in range(K)]
    s = am.Settings(steps=3, batch_size=4)
    a = am.adamerge("layer_wise", encoder, finetuned, heads, [UnlabeledImages(cache, r) for r in rows], s,
                    device="cpu", progress=False)
    b = am.adamerge("layer_wise", encoder, finetuned, heads, [cache[:][0][r] for r in rows], s,
                    device="cpu", progress=False)
    assert a.entropy == b.entropy and torch.equal(a.lambdas, b.lambdas)


def test_a_diverged_run_stops_at_its_first_non_finite_step(zoo):
    encoder, _, finetuned, heads, images = zoo
    with pytest.raises(FloatingPointError, match=r"AdaMerging layer_wise: the entropy loss is nan at step 1 "
                                                 r"\(lr 1e\+38\): the optimisation diverged.*Lower lr"):
        am.adamerge("layer_wise", encoder, finetuned, heads, images, am.Settings(steps=25, lr=1e38), progress=False)
    with pytest.raises(FloatingPointError, match=r"coefficients are NaN after step 1 \(lr 1e\+38\)"):
        am.adamerge("layer_wise", encoder, finetuned, heads, images, am.Settings(steps=1, lr=1e38), progress=False)
    bad = [{k: v.clone() for k, v in sd.items()} for sd in finetuned]
    bad[0]["proj"][0, 0] = float("inf")
    with pytest.raises(FloatingPointError, match=r"the entropy loss is nan at step 0 .*precision fp32 \(not bf16\).*"
                                                 r"check the fine-tuned encoders"):
        am.adamerge("task_wise", encoder, bad, heads, images, am.Settings(steps=3, precision="bf16"), progress=False)


def test_test_sets_smaller_than_a_steps_batches_are_refused_unless_allowed(zoo):
    from pipeline.merging.contract import Inputs

    encoder, _, finetuned, heads, images = zoo
    small = [images[0], images[1][:20], images[2]]
    spec = registry.method("adamerging_task_wise")
    inputs = Inputs(encoder.state_dict(), ["x", "y", "z"], encoder=encoder, finetuned=finetuned, heads=heads,
                    test=small, device="cpu", progress=False)
    with pytest.raises(ValueError, match=r"AdaMerging task_wise: task 'y' has 20 unlabeled test images, fewer than "
                                         r"batch_size 16 x batches_per_task 2 = 32 drawn per step"):
        spec.run(inputs, spec.configure({"steps": 2}))
    allowed = spec.run(inputs, spec.configure({"steps": 2, "allow_small_test_sets": True})).details["result"]
    assert len(allowed.entropy) == 2
    assert spec.run(inputs, spec.configure({"steps": 2, "batch_size": 10})).details["result"].entropy


def test_the_optimizer_takes_integer_betas_from_a_config():
    """``betas: [0, 0.999]`` configures (the schema takes numbers); Adam itself refuses a
    mix of int and float betas, so they are passed as floats."""
    from types import SimpleNamespace

    settings = registry.method("adamerging_task_wise").configure({"betas": [0, 0.999], "lr": 1})
    opt = am.lambda_optimizer(SimpleNamespace(lambda_raw=torch.nn.Parameter(torch.zeros(2, 1))), settings)
    assert opt.defaults["betas"] == (0.0, 0.999)
