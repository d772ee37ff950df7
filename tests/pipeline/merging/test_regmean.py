"""RegMean: joint least squares on linear layers, Gram matrices of attention and CLIP encoders."""
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from pipeline.merging import registry, regmean
from pipeline.merging.contract import Inputs, MergedState


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


def test_a_non_finite_regmean_merge_is_refused_when_saved(tmp_path):
    states = [{"w": torch.ones(2, 3)}, {"w": torch.ones(2, 3)}]
    gram = torch.eye(3, dtype=torch.float64)
    gram[0, 0] = float("inf")  # inputs that overflowed
    merge = MergedState(regmean.regmean_average(zip(states, [{"w": gram}, {"w": torch.eye(3, dtype=torch.float64)}])))
    with pytest.raises(ValueError, match=r"refusing to write \S+m\.safetensors: tensor 'w' contains NaN or Inf"):
        merge.save(tmp_path / "m.safetensors")
    assert list(tmp_path.iterdir()) == []
