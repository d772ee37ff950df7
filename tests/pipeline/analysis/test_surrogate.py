"""Entropy as a surrogate of the loss: Spearman against scipy, per-sample tables, the scatter."""
import numpy as np
import pandas as pd
import pytest
import torch
from helpers.analysis import TASKS, _png
from scipy.stats import spearmanr
from torch import nn
from torch.utils.data import TensorDataset

from pipeline.analysis import surrogate


def test_spearman_equals_scipy_on_a_constructed_example():
    rng = np.random.default_rng(0)
    ent = rng.random(50)
    loss = ent**2 + 0.3 * rng.random(50)
    samples = pd.DataFrame({"lambda": 0.3, "task": "a", "sample": range(50), "entropy": ent, "loss": loss,
                            "correct": True})
    samples = pd.concat([samples, samples.assign(task="b", loss=-loss)], ignore_index=True)
    table = surrogate.spearman_table(samples)
    assert list(table.columns) == surrogate.SPEARMAN_COLUMNS
    rho = table.set_index("task")["spearman"]
    assert rho["a"] == pytest.approx(spearmanr(ent, loss).statistic)
    assert rho["b"] == pytest.approx(-rho["a"])
    assert rho["all"] == pytest.approx(spearmanr(samples["entropy"], samples["loss"]).statistic)
    monotone = pd.DataFrame({"lambda": 0.1, "task": "m", "sample": range(5), "entropy": [1, 2, 3, 4, 5],
                             "loss": [0.1, 0.5, 0.6, 2.0, 9.0], "correct": True})
    assert surrogate.spearman_table(monotone)["spearman"].iloc[0] == pytest.approx(1.0)


def test_per_sample_table_and_scatter(tmp_path):
    torch.manual_seed(0)
    encoder = nn.Linear(6, 4)
    pretrained = {k: v.clone() for k, v in encoder.state_dict().items()}
    vector = {"weight": torch.randn(4, 6) * 0.1}
    tasks = [(t, torch.randn(3, 4) * 10, TensorDataset(torch.randn(40, 6), torch.randint(0, 3, (40,)))) for t in TASKS]
    samples = surrogate.sample_table(encoder, pretrained, vector, [0.1, 0.5], tasks, batch_size=16, max_samples=30)
    assert list(samples.columns) == surrogate.SAMPLE_COLUMNS and len(samples) == 2 * 3 * 30
    assert (samples["entropy"] >= 0).all() and (samples["entropy"] <= np.log(3) + 1e-5).all()
    assert (samples["loss"] >= 0).all()
    # the loss is the cross-entropy of the merged model at that lambda
    encoder.load_state_dict({"weight": pretrained["weight"] + 0.5 * vector["weight"], "bias": pretrained["bias"]})
    x, y = tasks[0][2].tensors
    from pipeline.models.clip import logits

    ce = torch.nn.functional.cross_entropy(logits(encoder(x[:30]), tasks[0][1]), y[:30], reduction="none")
    got = samples[(samples["lambda"] == 0.5) & (samples["task"] == TASKS[0])]["loss"].to_numpy()
    np.testing.assert_allclose(got, ce.detach().numpy(), rtol=1e-5)
    surrogate.plot_scatter(samples, surrogate.spearman_table(samples), tmp_path / "e.png")
    _png(tmp_path / "e.png")
