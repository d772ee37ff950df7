"""WEMoE on the tiny synthetic ViT: constant routers are Task Arithmetic / task-wise merging,
the batched routed MLP's router gradient is a naive per-sample weight rebuild's, training
lowers the entropy, and the saved merge routes as the trained one."""

import types

import pytest
import torch
import torch.nn.functional as F
from helpers.adamerging import K, perturbed_zoo
from torch.func import functional_call

from pipeline.merging import adamerging as am
from pipeline.merging import registry
from pipeline.merging import wemoe as wm
from pipeline.merging.contract import Inputs

# fp32 against float64 references / against another fp32 summation order
REF_TOL = {"rtol": 1e-5, "atol": 1e-5}
GRAD_TOL = {"rtol": 1e-4, "atol": 1e-7}


@pytest.fixture(scope="module")
def zoo():
    return perturbed_zoo()


def _fix_routers(model: wm.WEMoE, lam: torch.Tensor) -> None:
    """Routers that output ``lam`` (K,) for every input: zero last weight, bias lam."""
    with torch.no_grad():
        for mlp in model.mlps.values():
            mlp.router.net[-1].weight.zero_()
            mlp.router.net[-1].bias.copy_(lam)


def _reference_state(pre, finetuned, ta_lam, mlp_lam, blocks):
    """float64: pre + ta_lam * sum tau outside the routed MLPs, pre + sum_k mlp_lam[k] tau_k in them."""
    out = {}
    for key, v in pre.items():
        if not v.is_floating_point():
            out[key] = v
            continue
        taus = [ft[key].double() - v.double() for ft in finetuned]
        routed = any(key.startswith(f"transformer.resblocks.{b}.mlp.") for b in blocks)
        out[key] = v.double() + sum((mlp_lam[k] if routed else ta_lam) * t for k, t in enumerate(taus))
    return out


@pytest.mark.parametrize("upper", [0, 2], ids=["all_blocks", "upper_2"])
@pytest.mark.parametrize("equal", [True, False], ids=["task_arithmetic", "task_wise"])
def test_constant_routers_are_task_arithmetic_or_task_wise_merging(zoo, upper, equal):
    encoder, pre, finetuned, _, images = zoo
    lam = torch.full((K,), 0.3) if equal else torch.tensor([0.1, 0.5, 0.8])
    model = wm.build(encoder, pre, finetuned, wm.Settings(upper_blocks=upper))
    _fix_routers(model, lam)
    assert len(model.mlps) == (upper or 4)
    x = images[0][:8]
    with torch.no_grad():
        got = model(x)
        expected = functional_call(encoder.double(), _reference_state(pre, finetuned, 0.3, lam.double(), model.mlps),
                                   (x.double(),))
    encoder.float()
    torch.testing.assert_close(got.double(), expected, **REF_TOL)


def test_equal_constant_routers_match_the_registry_task_arithmetic(zoo, tmp_path):
    """All routers at 0.3 and the rest at 0.3: the Task Arithmetic merge of the store, lambda 0.3."""
    from helpers.merging import make_store

    encoder, pre, finetuned, _, images = zoo
    store = make_store(tmp_path, {str(k): ft for k, ft in enumerate(finetuned)}, pre)
    spec = registry.method("task_arithmetic")
    ta = spec.run(Inputs(pre, store.tasks, store), spec.configure(lam=0.3)).state_dict()
    model = wm.build(encoder, pre, finetuned, wm.Settings(router_hidden_layers=0))
    x = images[1][:8]
    with torch.no_grad():
        torch.testing.assert_close(model(x), functional_call(encoder, ta, (x,)), rtol=1e-5, atol=1e-5)


def _naive_forward(taus):
    """A routed MLP's forward that builds its weights for each sample and runs it alone."""
    def forward(self, z):
        outs = []
        for b in range(z.shape[0]):
            r = self.router(z[b:b + 1])[0]
            w = {key: base + torch.einsum("k,k...->...", r, taus[key]) for key, base in (
                ("c_fc.weight", self.c_fc.weight), ("c_fc.bias", self.c_fc.bias),
                ("c_proj.weight", self.c_proj.weight), ("c_proj.bias", self.c_proj.bias))}
            h = self.gelu(F.linear(z[b:b + 1], w["c_fc.weight"], w["c_fc.bias"]))
            outs.append(F.linear(h, w["c_proj.weight"], w["c_proj.bias"]))
        return torch.cat(outs)
    return forward


@pytest.mark.parametrize("depth", [1, 2])
def test_router_gradient_matches_a_per_sample_weight_rebuild(zoo, depth):
    encoder, pre, finetuned, heads, images = zoo
    model = wm.build(encoder, pre, finetuned, wm.Settings(router_hidden_layers=depth))
    with torch.no_grad():  # routers that route: weights large enough to vary per sample
        for p in model.router_parameters():
            p.normal_(0.0, 0.3)
    naive = wm.build(encoder, pre, finetuned, wm.Settings(router_hidden_layers=depth))
    naive.load_state_dict(model.state_dict())
    for b, mlp in naive.mlps.items():
        prefix = f"transformer.resblocks.{b}.mlp."
        taus = {key: torch.stack([ft[prefix + key] - pre[prefix + key] for ft in finetuned])
                for key in ("c_fc.weight", "c_fc.bias", "c_proj.weight", "c_proj.bias")}
        mlp.forward = types.MethodType(_naive_forward(taus), mlp)
    x, sizes = am.draw_batches(images, 4, 1, torch.Generator().manual_seed(0))
    loss = am.entropy_loss(model(x), heads, sizes)
    loss.backward()
    naive_loss = am.entropy_loss(naive(x), heads, sizes)
    naive_loss.backward()
    torch.testing.assert_close(loss, naive_loss, rtol=1e-5, atol=1e-6)
    r = torch.cat([m.routing for m in model.mlps.values()])
    assert r.std(0).min() > 1e-3  # the routing weights differ between samples
    for p, q in zip(model.router_parameters(), naive.router_parameters(), strict=True):
        assert p.grad.abs().max() > 0
        torch.testing.assert_close(p.grad, q.grad, **GRAD_TOL)


def test_batch_reduce_routes_each_group_by_its_mean(zoo):
    encoder, pre, finetuned, _, images = zoo
    model = wm.build(encoder, pre, finetuned)
    with torch.no_grad():
        for p in model.router_parameters():
            p.normal_(0.0, 0.3)
    x = torch.cat([images[0][:3], images[1][:5]])
    with torch.no_grad():
        model(x, groups=[3, 5])
        grouped = model.routing()
        model(x[:3])
        alone = model.routing()
    first = next(iter(model.mlps))  # the first routed block sees the same inputs either way
    torch.testing.assert_close(grouped[first][:3], alone[first].mean(0).expand(3, -1))
    assert torch.equal(grouped[first][3], grouped[first][7])


def test_training_lowers_the_entropy_and_the_saved_merge_routes_the_same(zoo, tmp_path):
    encoder, pre, finetuned, heads, images = zoo
    spec = registry.method("wemoe")
    inputs = Inputs(pre, ["a", "b", "c"], encoder=encoder, finetuned=finetuned, heads=heads, test=images,
                    progress=False)
    result = spec.run(inputs, spec.configure(steps=30, lr=1e-2, batch_size=8))
    first, last = sum(result.entropy[:5]) / 5, sum(result.entropy[-5:]) / 5
    assert last < first
    assert set(result.routing["task"]) == {"a", "b", "c"} and set(result.routing["expert"]) == {"a", "b", "c"}
    assert set(result.routing["block"]) == {0, 1, 2, 3}
    result.save(tmp_path / "wemoe.safetensors")
    routed = list(spec.route(tmp_path / "wemoe.safetensors", encoder, ["a", "b", "c"]))
    assert len(routed) == 3 and routed[0] is routed[2]
    with torch.no_grad():
        torch.testing.assert_close(routed[0](images[2][:6]), result.model(images[2][:6]), rtol=0, atol=0)


def test_bad_settings_are_refused(zoo):
    encoder, pre, finetuned, heads, images = zoo
    with pytest.raises(ValueError, match="upper_blocks 9 exceeds the encoder's 4"):
        wm.build(encoder, pre, finetuned, wm.Settings(upper_blocks=9))
    with pytest.raises(ValueError, match="task '0' has 32 unlabeled test images, fewer than batch_size 64"):
        wm.wemoe(encoder, pre, finetuned, heads, images, wm.Settings(batch_size=64), progress=False)
    with pytest.raises(ValueError, match="precision 'fp8' unknown"):
        wm.Settings(precision="fp8")


class _GroupMean(torch.nn.Module):
    """A router whose per-sample weights are replaced by their mean over each group."""

    def __init__(self, router, sizes):
        super().__init__()
        self.router, self.sizes = router, sizes

    def forward(self, z):
        return torch.cat([g.mean(0, keepdim=True).expand(len(g), -1) for g in self.router(z).split(self.sizes)])


def test_grouped_routing_is_per_sample_routing_with_the_group_means(zoo):
    """batch_reduce's path (one weight set per group) against the per-sample path given each
    group's mean routing weights: outputs and router gradients."""
    encoder, pre, finetuned, heads, images = zoo
    model = wm.build(encoder, pre, finetuned)
    with torch.no_grad():
        for p in model.router_parameters():
            p.normal_(0.0, 0.3)
    per_sample = wm.build(encoder, pre, finetuned)
    per_sample.load_state_dict(model.state_dict())
    sizes = [3, 5, 4]
    for mlp in per_sample.mlps.values():
        mlp.router = _GroupMean(mlp.router, sizes)
    x = torch.cat([images[k][:n] for k, n in enumerate(sizes)])
    batch_sizes = [[n] for n in sizes]
    loss = am.entropy_loss(model(x, sizes), heads, batch_sizes)
    loss.backward()
    reference = am.entropy_loss(per_sample(x), heads, batch_sizes)
    reference.backward()
    torch.testing.assert_close(loss, reference, rtol=1e-5, atol=1e-6)
    for p, q in zip(model.router_parameters(), per_sample.router_parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, **GRAD_TOL)
