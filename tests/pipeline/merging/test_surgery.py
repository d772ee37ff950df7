"""Representation Surgery on the tiny synthetic ViT: a module with zero W_up is the base merge
exactly, the module and loss are the paper's formula, training lowers each task's L1 distance
to its own encoder's features, the saved merge routes each task through its module."""

import pytest
import torch
from helpers.adamerging import K, perturbed_zoo
from helpers.merging import make_store
from torch.func import functional_call

from pipeline.merging import registry
from pipeline.merging import surgery as sg
from pipeline.merging.contract import Inputs
from pipeline.models.checkpoints import save_state_dict

TASKS = ["a", "b", "c"]


@pytest.fixture(scope="module")
def zoo():
    return perturbed_zoo()


def _task_arithmetic(pre, finetuned, lam=0.3):
    return {k: v + lam * sum(ft[k] - v for ft in finetuned) if v.is_floating_point() else v for k, v in pre.items()}


def _inputs(zoo, base=None, **kw):
    encoder, pre, finetuned, heads, images = zoo
    return Inputs(pre, TASKS, encoder=encoder, finetuned=finetuned, heads=heads, test=images, base=base,
                  progress=False, **kw)


def test_zero_up_projection_is_the_base_merge_exactly(zoo):
    encoder, pre, finetuned, _, images = zoo
    encoder.load_state_dict(_task_arithmetic(pre, finetuned))
    modules = sg.SurgeryModules(K, 64, 16, torch.Generator().manual_seed(0))
    assert modules.down.abs().min() > 0 and not modules.up.any()
    x = images[0][:8]
    with torch.no_grad():
        z = encoder(x)
        assert torch.equal(sg.SurgeryEncoder(encoder, modules.down[1], modules.up[1])(x), z)
        assert torch.equal(modules(z.expand(K, -1, -1)), z.expand(K, -1, -1))


def test_module_is_the_papers_formula(zoo):
    g = torch.Generator().manual_seed(3)
    modules = sg.SurgeryModules(K, 64, 16, g)
    with torch.no_grad():
        modules.up.normal_(generator=g)
    z = torch.randn(K, 5, 64, generator=g)
    for k in range(K):  # float64: z - W_up ReLU(W_down z)
        zk = z[k].double()
        expected = zk - (modules.up[k].double() @ (modules.down[k].double() @ zk.T).clamp_min(0)).T
        torch.testing.assert_close(modules(z)[k].double(), expected, rtol=1e-5, atol=1e-5)
    enc = sg.SurgeryEncoder(torch.nn.Identity(), modules.down[2].detach(), modules.up[2].detach())
    torch.testing.assert_close(enc(z[2]), modules(z)[2], rtol=1e-6, atol=1e-6)


def test_training_lowers_each_tasks_l1_distance_and_routes_saved_modules(zoo, tmp_path):
    encoder, pre, finetuned, _, images = zoo
    base = tmp_path / "base.safetensors"
    save_state_dict(_task_arithmetic(pre, finetuned), base)
    spec = registry.method("surgery")
    result = spec.run(_inputs(zoo, base), spec.configure(base="task_arithmetic", steps=150, lr=1e-2, batch_size=8))
    first, last = torch.tensor(result.losses[:10]).mean(0), torch.tensor(result.losses[-10:]).mean(0)
    assert (last < 0.8 * first).all(), (first, last)
    assert result.added_parameters() == K * 2 * 16 * 64
    result.save(tmp_path / "surgery" / "model.json")
    assert sorted(p.name for p in (tmp_path / "surgery" / sg.MODULES).iterdir()) == [f"{t}.safetensors" for t in TASKS]
    models = list(spec.route(tmp_path / "surgery" / "model.json", encoder, TASKS))
    x = images[1][:6]
    with torch.no_grad():
        z = functional_call(encoder, _task_arithmetic(pre, finetuned), (x,))
        for k, model in enumerate(models):
            expected = result.modules(z.expand(K, -1, -1))[k]
            torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)
        own = functional_call(encoder, finetuned[1], (x,))
        before = (z - own).abs().mean()
        after = (models[1](x) - own).abs().mean()
    assert after < before


def test_without_a_base_file_the_base_method_runs_on_the_inputs(zoo, tmp_path):
    encoder, pre, finetuned, _, images = zoo
    store = make_store(tmp_path, dict(zip(TASKS, finetuned)), pre)
    spec = registry.method("surgery")
    result = spec.run(_inputs(zoo, store=store), spec.configure(base="weight_averaging", steps=0))
    wa = registry.method("weight_averaging").run(Inputs(pre, TASKS, store)).state_dict()
    assert result.base.keys() == wa.keys() and all(torch.equal(result.base[k], wa[k]) for k in wa)
    assert result.losses == [] and not result.modules.up.any()
    result.save(tmp_path / "s" / "model.json")
    assert (tmp_path / "s" / "base.safetensors").exists()
    model = next(spec.route(tmp_path / "s" / "model.json", encoder, TASKS))
    with torch.no_grad():
        assert torch.equal(model(images[0][:4]), functional_call(encoder, wa, (images[0][:4],)))


def test_a_routed_base_is_refused(zoo):
    spec = registry.method("surgery")
    with pytest.raises(ValueError, match="Surgery's base 'wemoe' is no single merged encoder"):
        spec.run(_inputs(zoo), spec.configure(base="wemoe"))
    with pytest.raises(ValueError, match="unknown merging method 'dare_ties'"):
        spec.run(_inputs(zoo), spec.configure(base="dare_ties"))
