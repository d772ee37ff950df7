"""RegMean++: block by block on the merged model's own features, against a float64 reference;
one task is that task's model; with every block's inputs the same as RegMean's it is RegMean."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from pipeline.merging import registry, regmean_plusplus
from pipeline.merging.contract import Inputs

D, H, T = 5, 7, 3  # width, hidden width, tokens


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.ln = nn.LayerNorm(D)
        self.fc1, self.fc2 = nn.Linear(D, H), nn.Linear(H, D)

    def forward(self, x):
        return x + self.fc2(torch.tanh(self.fc1(self.ln(x))))


class _TwoBlocks(nn.Module):
    """A position embedding, then two residual MLP blocks at transformer.resblocks (as open_clip)."""

    def __init__(self):
        super().__init__()
        self.pos = nn.Parameter(torch.randn(T, D))
        self.transformer = nn.Module()
        self.transformer.resblocks = nn.ModuleList([_Block(), _Block()])

    def forward(self, x):
        x = x + self.pos
        for block in self.transformer.resblocks:
            x = block(x)
        return x[:, 0]


def _reference(states, data, alpha):
    """RegMean++ written out in float64: the mean stem, then per block the candidates' Grams on
    the merged model's features, W = (sum G~_k)^-1 sum G~_k W_k^T (G~: off-diagonals times
    alpha), other tensors averaged, and the features through the merged block."""
    states = [{k: v.double() for k, v in s.items()} for s in states]
    out = {k: torch.stack([s[k] for s in states]).mean(0) for k in states[0]}
    feats = [x.double() + out["pos"] for x in data]

    def ln(x, s, p):
        return F.layer_norm(x, (D,), s[p + "ln.weight"], s[p + "ln.bias"])

    def block(x, s, p):
        return x + F.linear(torch.tanh(F.linear(ln(x, s, p), s[p + "fc1.weight"], s[p + "fc1.bias"])),
                            s[p + "fc2.weight"], s[p + "fc2.bias"])

    def reduced(rows):
        rows = rows.reshape(-1, rows.shape[-1])
        g = rows.T @ rows / len(rows)
        return alpha * g + (1 - alpha) * torch.diag(torch.diagonal(g))

    for index in range(2):
        p = f"transformer.resblocks.{index}."
        g1 = [reduced(ln(x, s, p)) for s, x in zip(states, feats)]
        g2 = [reduced(torch.tanh(F.linear(ln(x, s, p), s[p + "fc1.weight"], s[p + "fc1.bias"])))
              for s, x in zip(states, feats)]
        for name, grams in (("fc1", g1), ("fc2", g2)):
            lhs = sum(grams)
            rhs = sum(g @ s[p + name + ".weight"].T for g, s in zip(grams, states))
            out[p + name + ".weight"] = torch.linalg.solve(lhs, rhs).T
        feats = [block(x, out, p) for x in feats]
    return out


def _run(encoder, states, data, **settings):
    spec = registry.method("regmean_plusplus")
    inputs = Inputs({}, [str(i) for i in range(len(states))], encoder=encoder, finetuned=states,
                    train=[TensorDataset(x, torch.zeros(len(x))) for x in data], progress=False)
    return spec.run(inputs, spec.configure(settings)).state_dict()


@pytest.mark.parametrize("alpha", [0.95, 0.5])
def test_regmean_plusplus_equals_the_float64_reference_on_two_blocks(alpha):
    g = torch.Generator().manual_seed(0)
    encoder = _TwoBlocks()
    base = {k: v.clone() for k, v in encoder.state_dict().items()}
    states = [{k: v + 0.3 * torch.randn(v.shape, generator=g) for k, v in base.items()} for _ in range(3)]
    data = [torch.randn(20, T, D, generator=g) * (1 + i) for i in range(3)]
    got = _run(encoder, states, data, examples=20, alpha=alpha)
    expected = _reference(states, data, alpha)
    assert got.keys() == expected.keys()
    for k in got:  # float32 features against float64 throughout: 6e-8 apart at most when written
        torch.testing.assert_close(got[k].double(), expected[k], rtol=1e-5, atol=1e-6, msg=k)
    # the merged model's features matter: RegMean's Grams (each candidate's own features) differ
    plain = registry.method("regmean").run(
        Inputs({}, ["0", "1", "2"], encoder=_TwoBlocks(), finetuned=states,
               train=[TensorDataset(x, torch.zeros(len(x))) for x in data]),
        registry.method("regmean").configure({"examples": 20, "alpha": alpha})).state_dict()
    second = "transformer.resblocks.1.fc1.weight"
    assert (plain[second] - got[second]).abs().max() > 1e-3


def _clip_encoder():
    from pipeline.models.clip import create_model

    return create_model("synth-vit-tiny", seed=0).visual


def _images(n, seed):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def test_one_task_is_that_tasks_model():
    encoder = _clip_encoder()
    g = torch.Generator().manual_seed(1)
    state = {k: v + 0.02 * torch.randn(v.shape, generator=g) for k, v in encoder.state_dict().items()}
    got = _run(encoder, [state], [_images(12, 2)], examples=12)
    assert got.keys() == state.keys()
    for k, value in state.items():
        torch.testing.assert_close(got[k], value, rtol=1e-4, atol=1e-5, msg=k)


def test_models_that_differ_only_in_their_last_block_merge_as_regmean():
    """Every block's inputs are then the same under both (the earlier blocks are shared), so
    RegMean++ is RegMean."""
    encoder = _clip_encoder()
    g = torch.Generator().manual_seed(3)
    last = f"transformer.resblocks.{len(regmean_plusplus.blocks(encoder)) - 1}."
    states = [{k: v + 0.05 * torch.randn(v.shape, generator=g) if k.startswith(last) else v.clone()
               for k, v in encoder.state_dict().items()} for _ in range(3)]
    data = [_images(10, 10 + i) for i in range(3)]
    got = _run(encoder, states, data, examples=10)
    spec = registry.method("regmean")
    inputs = Inputs({}, ["0", "1", "2"], encoder=_clip_encoder(), finetuned=states,
                    train=[TensorDataset(x, torch.zeros(len(x))) for x in data])
    expected = spec.run(inputs, spec.configure({"examples": 10})).state_dict()
    for k in expected:
        torch.testing.assert_close(got[k], expected[k], rtol=1e-4, atol=1e-5, msg=k)
    assert not torch.allclose(got[last + "mlp.c_fc.weight"], states[0][last + "mlp.c_fc.weight"])


def test_an_encoder_without_blocks_is_refused_naming_what_it_needs():
    with pytest.raises(ValueError, match=r"RegMean\+\+ merges block by block: the encoder \(Linear\) needs its "
                                         r"blocks in an nn.ModuleList at transformer.resblocks"):
        _run(nn.Linear(3, 2), [nn.Linear(3, 2).state_dict()], [torch.randn(4, 3)], examples=4)
