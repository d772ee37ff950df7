"""Merging methods against plain dense torch implementations written here."""
import math

import pytest
import torch
from helpers.merging import (
    FT_CFG,
    TASKS,
    _classification,
    _tiny_zoo,
    assert_state_close,
    dense_tvs,
    make_store,
    merged,
    train_jointly,
    unflatten,
)
from helpers.store import encoder_state, finetune
from safetensors.torch import save_file

from pipeline.merging import registry
from pipeline.merging.contract import Inputs
from pipeline.store.task_vectors import TaskVectorStore, write_task_vector


@pytest.fixture
def zoo(tmp_path):
    pre = encoder_state()
    fts = {t: finetune(pre, i + 1) for i, t in enumerate(TASKS)}
    return pre, fts, make_store(tmp_path, fts, pre)


def vector(name: str, store: TaskVectorStore, **settings) -> dict:
    """The merged task vector of a searched method (before its lambda)."""
    spec = registry.method(name)
    return spec.run(Inputs({}, store.tasks, store), spec.configure(settings)).vector()


def dense_ties(tvs: torch.Tensor, k: float, merge: str) -> torch.Tensor:
    """TIES semantics (kernels.ties_merge docstring), written directly."""
    d = tvs.shape[1]
    keep = math.floor(d * k / 100)
    mags = tvs.abs()
    if keep == d:
        thr = torch.zeros(len(tvs), 1)
    else:
        thr = mags.sort(dim=1).values[:, d - keep - 1:d - keep]  # the (d - keep)-th smallest, 1-based
    trimmed = torch.where(mags >= thr, tvs, 0.0)
    sign = torch.sign(trimmed.sum(0))
    sign[sign == 0] = torch.sign(sign.sum())
    agree = torch.where(sign > 0, trimmed > 0, trimmed < 0)
    total = torch.where(agree, trimmed, 0.0).sum(0)
    return total / agree.sum(0).clamp(min=1) if merge == "mean" else total


def test_weight_averaging(zoo):
    pre, fts, store = zoo
    expected = {k: torch.stack([ft[k].float() for ft in fts.values()]).mean(0).to(v.dtype)
                if v.is_floating_point() else v for k, v in pre.items()}
    got = merged("weight_averaging", pre, store)
    assert_state_close({k: v for k, v in got.items() if k != "half.weight"},
                       {k: v for k, v in expected.items() if k != "half.weight"})
    torch.testing.assert_close(got["half.weight"], expected["half.weight"], rtol=1e-3, atol=1e-3)  # fp16 rounding


@pytest.mark.parametrize("lam", [0.3, 1.0])
def test_task_arithmetic_exact(zoo, lam):
    pre, fts, store = zoo
    assert_state_close(merged("task_arithmetic", pre, store, lam=lam), unflatten(pre, dense_tvs(pre, fts).sum(0), lam),
                       exact=True)


def test_task_negation_subtracts(zoo, tmp_path):
    pre, fts, _ = zoo
    only_a = TaskVectorStore(tmp_path / "tv.zarr", ["a"])
    tvs = dense_tvs(pre, {"a": fts["a"]})
    assert_state_close(merged("task_negation", pre, only_a, lam=-0.5), unflatten(pre, tvs[0], -0.5), exact=True)
    with pytest.raises(ValueError, match="negative lambda"):
        merged("task_negation", pre, only_a, lam=0.5)


@pytest.mark.parametrize("merge", ["mean", "sum"])
@pytest.mark.parametrize("k", [10, 20, 100])
def test_ties_matches_dense(zoo, k, merge):
    pre, fts, store = zoo
    expected = unflatten(pre, dense_ties(dense_tvs(pre, fts), k, merge), 0.3)
    assert_state_close(merged("ties_merging", pre, store, k=k, merge=merge, lam=0.3), expected)


@pytest.mark.parametrize("merge", ["mean", "sum"])
@pytest.mark.parametrize("k", [0, 10, 20, 50, 100])
def test_ties_keeps_exactly_with_ties_and_zero_signs(tmp_path, k, merge):
    """Few magnitude levels: many entries tie at the threshold, and +x/-x pairs elect sign 0."""
    pre = encoder_state()
    g = torch.Generator().manual_seed(k)
    fts, prev = {}, None
    for i, t in enumerate(TASKS):
        steps = {key: torch.randint(-2, 3, v.shape, generator=g) * 0.25 for key, v in pre.items()}
        if i % 2:  # task b cancels task a, task d cancels task c on the first tensor: zero elected signs
            steps["conv1.weight"] = -prev["conv1.weight"]
        prev = steps
        fts[t] = {key: (v.float() + steps[key]).to(v.dtype) if v.is_floating_point() else v for key, v in pre.items()}
    store = make_store(tmp_path, fts, pre)
    tvs = dense_tvs(pre, fts)
    expected = dense_ties(tvs, k, merge)
    got = vector("ties_merging", store, k=k, merge=merge)
    flat = torch.cat([got[key].reshape(-1) for key in store.keys])
    assert torch.equal(flat, expected)
    zero_sign = (tvs[0] == -tvs[1]) & (tvs[2] == -tvs[3])
    assert zero_sign.any()


def test_ties_rejects_bad_settings(zoo):
    _, _, store = zoo
    with pytest.raises(ValueError, match="mean"):
        vector("ties_merging", store, k=20, merge="max")
    with pytest.raises(ValueError, match="percentage"):
        vector("ties_merging", store, k=120, merge="mean")


# ---- methods that read models and data -------------------------------------------------------

from torch import nn  # noqa: E402
from torch.utils.data import TensorDataset  # noqa: E402

from pipeline.evaluation import accuracy  # noqa: E402
from pipeline.merging import fisher_merging, regmean  # noqa: E402


def test_regmean_linear_equals_joint_least_squares():
    g = torch.Generator().manual_seed(0)
    encoder = nn.Sequential(nn.Linear(6, 4, bias=False))
    states, data = [], []
    for _ in range(3):
        states.append({"0.weight": torch.randn(4, 6, generator=g)})
        data.append(torch.randn(40, 6, generator=g) * torch.rand(6, generator=g))
    inputs = Inputs({}, [str(i) for i in range(3)], encoder=encoder, finetuned=states,
                    train=[TensorDataset(x, torch.zeros(len(x))) for x in data])
    merged = registry.method("regmean").run(inputs, regmean.Settings(examples=40, alpha=1.0)).state_dict()
    x = torch.cat(data).double()
    y = torch.cat([xk.double() @ s["0.weight"].double().T for xk, s in zip(data, states)])
    expected = torch.linalg.lstsq(x, y).solution.T.float()
    torch.testing.assert_close(merged["0.weight"], expected, rtol=1e-5, atol=1e-5)


def test_regmean_alpha_zero_is_diagonal_and_other_tensors_averaged():
    g = torch.Generator().manual_seed(1)
    states = [{"w": torch.randn(3, 2, generator=g), "b": torch.randn(3, generator=g)} for _ in range(2)]
    grams = [{"w": (lambda a: a.T @ a)(torch.randn(5, 2, generator=g).double())} for _ in range(2)]
    merged = regmean.regmean_average(zip(states, grams), alpha=0.0)
    d = [torch.diagonal(gr["w"]) for gr in grams]
    expected = ((d[0][None] * states[0]["w"] + d[1][None] * states[1]["w"]) / (d[0] + d[1])[None]).float()
    torch.testing.assert_close(merged["w"], expected)
    torch.testing.assert_close(merged["b"], (states[0]["b"] + states[1]["b"]) / 2)


class _Attention(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, 2, batch_first=True)

    def forward(self, x):
        return self.attn(x, x, x, need_weights=False)[0]


def test_regmean_grams_of_attention_projections():
    torch.manual_seed(0)
    model = _Attention(8).eval()
    x = torch.randn(6, 5, 8)
    grams = regmean.gram_matrices(model, TensorDataset(x, torch.zeros(6)), examples=6, batch_size=4)
    assert set(grams) == {"attn.in_proj_weight", "attn.out_proj.weight"}
    rows = x.reshape(-1, 8).double()
    torch.testing.assert_close(grams["attn.in_proj_weight"], rows.T @ rows / len(rows))
    with torch.no_grad():  # context = (output - bias) @ inverse(W_out^T)
        out = model(x).reshape(-1, 8).double()
        proj = model.attn.out_proj
        ctx = (out - proj.bias.double()) @ torch.linalg.inv(proj.weight.double().T)
    torch.testing.assert_close(grams["attn.out_proj.weight"], ctx.T @ ctx / len(ctx), rtol=1e-4, atol=1e-5)


def test_regmean_covers_every_linear_of_a_clip_encoder():
    from pipeline.models.clip import create_model

    encoder = create_model("synth-vit-tiny", seed=0).visual
    data = TensorDataset(torch.randn(4, 3, 32, 32), torch.zeros(4))
    grams = regmean.gram_matrices(encoder, data, examples=4)
    linear = {k for k, v in encoder.state_dict().items()
              if k.endswith(("in_proj_weight", "out_proj.weight", "c_fc.weight", "c_proj.weight"))}
    assert set(grams) == linear and linear
    assert all(bool(torch.isfinite(g).all()) for g in grams.values())


@pytest.mark.parametrize("normalize", [True, False])
def test_fisher_with_equal_fishers_is_averaging(normalize):
    g = torch.Generator().manual_seed(2)
    states = [{"w": torch.randn(3, 4, generator=g), "buf": torch.randn(2, generator=g), "n": torch.tensor(7)}
              for _ in range(3)]
    fisher = {"w": torch.rand(3, 4, generator=g)}
    merged = fisher_merging.fisher_average([(s, fisher) for s in states], normalize=normalize)
    for key in ("w", "buf"):
        torch.testing.assert_close(merged[key], torch.stack([s[key] for s in states]).mean(0))
    assert merged["n"] == 7


def test_fisher_weights_follow_the_data():
    torch.manual_seed(0)
    encoder = nn.Linear(6, 4)
    head = torch.randn(2, 4) * 5
    x, y = _classification(0)
    fisher = fisher_merging.diagonal_fisher(encoder, head, TensorDataset(x, y), examples=32)
    assert fisher.keys() == dict(encoder.named_parameters()).keys()
    assert all((f >= 0).all() and f.sum() > 0 for f in fisher.values())
    # a model that is unchanged by fine-tuning is returned unchanged
    state = {k: v.clone() for k, v in encoder.state_dict().items()}
    inputs = Inputs({}, ["a", "b"], encoder=encoder, finetuned=[state, state], heads=[head, -head],
                    train=[TensorDataset(x, y)] * 2)
    got = registry.method("fisher_merging").run(inputs, fisher_merging.Settings(examples=16)).state_dict()
    for k in state:
        torch.testing.assert_close(got[k], state[k])


def test_task_negation_lowers_the_negated_task(tmp_path):
    encoder, pre, heads, data = _tiny_zoo()
    tuned = train_jointly(encoder, heads[:1], data[:1])
    save_file(tuned, tmp_path / "a.safetensors")
    write_task_vector(tmp_path / "tv.zarr", "a", pre, tuned, tmp_path / "a.safetensors")
    negated = merged("task_negation", pre, TaskVectorStore(tmp_path / "tv.zarr", ["a"]), lam=-1.0)

    def acc(state):
        encoder.load_state_dict(state)
        return accuracy(encoder, heads[0], TensorDataset(*data[0]))["accuracy"]

    assert acc(tuned) > acc(pre) > acc(negated)


def test_multitask_learns_every_task():
    encoder, pre, heads, data = _tiny_zoo()
    before = [accuracy(encoder, h, TensorDataset(*d))["accuracy"] for h, d in zip(heads, data)]
    state = train_jointly(encoder, heads, data)
    encoder.load_state_dict(state)
    after = [accuracy(encoder, h, TensorDataset(*d))["accuracy"] for h, d in zip(heads, data)]
    assert all(a > 85 and a > b for a, b in zip(after, before)), (before, after)


# ---- lambda search and the CLI verbs on a fabricated synthetic-format zoo -------------------

import json  # noqa: E402

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from pipeline.cli import main  # noqa: E402
from pipeline.merging.lambda_search import grid  # noqa: E402


def test_grid():
    assert grid(0.0, 1.0, 0.1) == [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]
    with pytest.raises(ValueError, match="step"):
        grid(0.0, 1.0, 0.0)


@pytest.fixture(scope="module")
def fake_zoo(tmp_path_factory):
    """Pretrained CLIP, heads, 'fine-tuned' encoders (pretrained + noise) and task data in the
    zoo's on-disk formats: exercises the verbs without training."""
    from pipeline.models.checkpoints import save_state_dict
    from pipeline.models.clip import create_model

    root = tmp_path_factory.mktemp("zoo")
    model = create_model("synth-vit-tiny", seed=0)
    save_state_dict(model.state_dict(), root / "pretrained.safetensors")
    rng = np.random.default_rng(0)
    for i, task in enumerate(("colour", "border")):
        g = torch.Generator().manual_seed(i)
        save_state_dict({"weight": torch.randn(3, 64, generator=g)}, root / f"{task}.head.safetensors")
        save_state_dict({k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in model.visual.state_dict().items()},
                        root / f"{task}.safetensors")
        np.savez(root / f"{task}.npz", **{f"{p}_{s}": a for s, n in (("train", 24), ("val", 12), ("test", 12))
                                          for p, a in (("x", rng.integers(0, 255, (n, 32, 32, 3), dtype=np.uint8)),
                                                       ("y", rng.integers(0, 3, n)))})
    return root


def _zoo_args(root):
    zoo = {"name": "t", "source": "synthetic", "arch": "synth-vit-tiny", "seed": 0,
           "synthetic": {"finetune": {"steps": 2, "batch_size": 4, "lr": 1e-4, "weight_decay": 0.0, "warmup": 1}}}
    return ["--zoo", json.dumps(zoo), "--threads", "1", "--pretrained", str(root / "pretrained.safetensors")]


def test_cli_verbs(fake_zoo):
    root, tasks = fake_zoo, ["colour", "border"]
    base = _zoo_args(root)
    for t in tasks:
        main(["task-vector", *base, "--task", t, "--finetuned", str(root / f"{t}.safetensors"),
              "--chunk-mib", "0.01", "--out", str(root / "tv.zarr" / t)])
    tvs = [str(root / "tv.zarr" / t) for t in tasks]
    heads_data = ["--heads", *[str(root / f"{t}.head.safetensors") for t in tasks],
                  "--data", *[str(root / f"{t}.npz") for t in tasks]]
    main(["merge", *base, "--method", "weight_averaging", "--task-vectors", *tvs, "--out", str(root / "wa.safetensors")])
    main(["merge", *base, "--method", "task_negation", "--task-vectors", tvs[0], "--settings", '{"lam": -1.0}',
          "--out", str(root / "neg.safetensors")])
    main(["lambda-search", *base, "--method", "ties_merging", "--task-vectors", *tvs, *heads_data,
          "--settings", '{"k": 20, "merge": "mean"}', "--grid", '{"start": 0.0, "stop": 1.0, "step": 0.5}',
          "--search-out", str(root / "search.parquet"), "--out", str(root / "ties.safetensors")])
    search = pd.read_parquet(root / "search.parquet")
    assert list(search.columns) == ["method", "lambda", "task", "split", "accuracy"]
    assert len(search) == 3 * 2 and set(search["split"]) == {"val"}
    record = json.loads((root / "ties.json").read_text())
    best = search.groupby("lambda")["accuracy"].mean().idxmax()
    assert record["settings"]["lam"] == best and record["tasks"] == tasks
    from pipeline.zoo.store import load_clip, load_encoder_state
    pretrained = load_clip({"arch": "synth-vit-tiny"}, root / "pretrained.safetensors").visual.state_dict()
    expected = merged("ties_merging", pretrained, TaskVectorStore(root / "tv.zarr", tasks), k=20, merge="mean", lam=best)
    assert_state_close(load_encoder_state(root / "ties.safetensors"), expected, exact=True)
    # every grid point is evaluated from the pretrained weights, not from the previous point
    main(["lambda-search", *base, "--method", "task_arithmetic", "--task-vectors", *tvs, *heads_data,
          "--grid", '{"start": 0.5, "stop": 0.5, "step": 0.1}', "--search-out", str(root / "ta.parquet"),
          "--out", str(root / "ta.safetensors")])
    ta = pd.read_parquet(root / "ta.parquet")
    torch.testing.assert_close(ta["accuracy"].tolist(), search[search["lambda"] == 0.5]["accuracy"].tolist())
    for method, settings in (("fisher_merging", '{"examples": 4}'), ("regmean", '{"examples": 8}')):
        main(["merge", *base, "--method", method, "--tasks", *tasks,
              "--finetuned", *[str(root / f"{t}.safetensors") for t in tasks], *heads_data,
              "--settings", settings, "--out", str(root / f"{method}.safetensors")])
    main(["merge", *base, "--method", "multitask", "--tasks", *tasks, *heads_data,
          "--settings", json.dumps(FT_CFG | {"steps": 2}), "--out", str(root / "mtl.safetensors")])
    reference = load_encoder_state(root / "colour.safetensors")
    for name in ("wa", "neg", "ties", "fisher_merging", "regmean", "mtl"):
        state = load_encoder_state(root / f"{name}.safetensors")
        assert state.keys() == reference.keys() and all(bool(torch.isfinite(v).all()) for v in state.values()), name
        assert (root / f"{name}.json").exists()
