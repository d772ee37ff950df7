"""The analyses on tiny synthetic inputs: parquet schemas, figures, Spearman, L2, corruptions,
and the report sections (with a chromium screenshot when chromium is installed)."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from helpers.analysis import (
    TASKS,
    _coefficient_inputs,
    _models,
    _pem_rows,
    _png,
    _robustness_rows,
    _unseen_rows,
)
from scipy.stats import spearmanr
from torch import nn
from torch.utils.data import TensorDataset

from pipeline.analysis import coefficients, distances, pem, robustness, sensitivity, surrogate, unseen
from pipeline.analysis.corruptions import CORRUPTIONS, corrupt
from pipeline.data.synthetic import render
from pipeline.models.checkpoints import save_state_dict


# ----------------------------------------------------------------- corruptions
@pytest.mark.parametrize("name", CORRUPTIONS)
def test_corruption_keeps_shape_and_dtype_and_changes_the_image(name):
    images = render(4, seed=1).images
    for severity in (1, 5):
        out = corrupt(images, name, severity, seed=0)
        assert out.shape == images.shape and out.dtype == np.uint8
        assert np.abs(out.astype(int) - images).mean() > 1.0, (name, severity)
    single = corrupt(images[0], name, 3)
    assert single.shape == images[0].shape and single.dtype == np.uint8 and not np.array_equal(single, images[0])
    np.testing.assert_array_equal(corrupt(images, name, 3, seed=7), corrupt(images, name, 3, seed=7))


def test_corruption_refuses_bad_input():
    with pytest.raises(ValueError, match="unknown corruption"):
        corrupt(render(1, 0).images, "fog")
    with pytest.raises(ValueError, match="severity"):
        corrupt(render(1, 0).images, "contrast", 6)
    with pytest.raises(ValueError, match="uint8"):
        corrupt(np.zeros((2, 8, 8, 3), np.float32), "contrast")


def test_normalisation_round_trip_is_exact():
    zoo = {"source": "synthetic"}
    images = render(3, 2).images
    np.testing.assert_array_equal(robustness.to_uint8(robustness.to_normalised(images, zoo), zoo), images)


# ----------------------------------------------------------------- sensitivity
def test_sensitivity_table_and_figure(tmp_path):
    curves = pd.DataFrame([{"method": m, "lambda": lam, "task": t, "split": s, "accuracy": 50 + 10 * lam + i}
                           for m in ("task_arithmetic", "ties_merging") for lam in (0.0, 0.5, 1.0)
                           for i, t in enumerate(TASKS) for s in ("val", "test")])
    refs = pd.DataFrame([{"model": m, "task": t, "accuracy": 70.0 + i} for m in ("adamerging_layer_wise", "multitask")
                         for i, t in enumerate(TASKS + ["other"])])
    table = sensitivity.sensitivity_table(curves, refs)
    assert list(table.columns) == sensitivity.COLUMNS
    assert len(table) == 2 * 3 * 2 + 2
    curve = table[(table["kind"] == "curve") & (table["method"] == "task_arithmetic") & (table["split"] == "val")]
    assert curve.set_index("lambda")["accuracy"][0.5] == pytest.approx(56.0)
    ref = table[table["kind"] == "reference"].set_index("method")["accuracy"]
    assert ref["multitask"] == pytest.approx(71.0)  # the task not in the curves is left out
    sensitivity.plot_sensitivity(table, tmp_path / "s.png")
    _png(tmp_path / "s.png")


# ---------------------------------------------------------------- coefficients
def test_coefficient_table_groups_blocks(tmp_path):
    lambdas, entropy = _coefficient_inputs()
    lambdas.to_parquet(tmp_path / "l.parquet")  # the round trip the workflow does
    table = coefficients.coefficient_table(pd.read_parquet(tmp_path / "l.parquet"))
    assert list(table.columns) == coefficients.COLUMNS
    lw = table[(table["variant"] == "layer_wise") & (table["task"] == "colour")]
    assert list(lw["group"]) == ["stem", "block 0", "block 1", "head"]
    assert list(lw["tensors"]) == [1, 2, 1, 2]
    final = lambdas[(lambdas["variant"] == "layer_wise") & (lambdas["step"] == 5) & (lambdas["task"] == "colour")]
    assert lw.set_index("group")["value"]["block 0"] == pytest.approx(final[final["block"] == 0]["value"].mean())
    tw = table[table["variant"] == "task_wise"]
    assert set(tw["group"]) == {"all"} and len(tw) == len(TASKS)
    coefficients.plot_layer_wise(table, tmp_path / "layer.png")
    coefficients.plot_task_wise(table, tmp_path / "task.png")
    coefficients.plot_entropy(entropy, tmp_path / "entropy.png")
    for name in ("layer", "task", "entropy"):
        _png(tmp_path / f"{name}.png")


# ------------------------------------------------------------------- distances
def test_l2_of_a_model_with_itself_is_zero_and_distances_are_exact(tmp_path):
    files = _models(tmp_path)
    d = distances.l2_distances({"x": files["finetuned_t0"], "y": files["finetuned_t0"]})
    assert list(d.columns) == ["a", "b", "l2"] and (d["l2"] == 0).all()
    d = distances.l2_distances(files, {"pretrained": "visual."})
    assert len(d) == 9
    m = d.set_index(["a", "b"])["l2"]
    assert m[("pretrained", "pretrained")] == 0
    assert m[("pretrained", "finetuned_t0")] == pytest.approx(0.1 * np.sqrt(17), rel=1e-5)
    assert m[("finetuned_t1", "finetuned_t0")] == pytest.approx(0.1 * np.sqrt(17), rel=1e-5)
    assert m[("pretrained", "finetuned_t1")] == m[("finetuned_t1", "pretrained")]
    distances.plot_matrix(d, "l2", tmp_path / "d.png", "L2")
    _png(tmp_path / "d.png")


def test_cosine_of_task_vectors_from_the_store(tmp_path):
    from pipeline.store.task_vectors import TaskVectorStore, write_task_vector

    pre = {"w": torch.zeros(6), "v": torch.zeros(2, 2)}
    vectors = {"t0": {"w": torch.tensor([1.0, 0, 0, 0, 0, 0]), "v": torch.zeros(2, 2)},
               "t1": {"w": torch.tensor([1.0, 1, 0, 0, 0, 0]), "v": torch.zeros(2, 2)},
               "t2": {"w": torch.zeros(6), "v": -torch.ones(2, 2)}}
    for t, sd in vectors.items():
        save_state_dict(sd, tmp_path / f"{t}.safetensors")
        write_task_vector(tmp_path / "tv.zarr", t, pre, sd, tmp_path / f"{t}.safetensors", chunk_mib=1e-5)
    cos = distances.cosine_matrix(TaskVectorStore(tmp_path / "tv.zarr", list(vectors)))
    assert list(cos.columns) == ["a", "b", "cosine"]
    c = cos.set_index(["a", "b"])["cosine"]
    assert c[("t0", "t1")] == pytest.approx(1 / np.sqrt(2)) and c[("t0", "t2")] == 0 and c[("t2", "t2")] == pytest.approx(1)
    distances.plot_matrix(cos, "cosine", tmp_path / "c.png", "cos", cmap="RdBu_r", fmt="{:.2f}", vmin=-1, vmax=1)
    _png(tmp_path / "c.png")


# ------------------------------------------------------------------- surrogate
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


# ---------------------------------------------------------- robustness, unseen
def test_robustness_figure(tmp_path):
    robustness.plot_robustness(_robustness_rows(), tmp_path / "r.png")
    _png(tmp_path / "r.png")


def test_corrupted_split_keeps_labels():
    zoo = {"source": "synthetic"}
    images = render(5, 3).images
    data = TensorDataset(robustness.to_normalised(images, zoo), torch.arange(5))
    out = robustness.corrupted_split(data, zoo, "pixelate", 3, seed=0)
    assert out.tensors[0].shape == data.tensors[0].shape and torch.equal(out.tensors[1], data.tensors[1])
    assert not torch.equal(out.tensors[0], data.tensors[0])
    assert torch.equal(robustness.corrupted_split(data, zoo, "clean", 3, 0).tensors[0], data.tensors[0])


def test_unseen_table_and_figure(tmp_path):
    table = unseen.unseen_table(_unseen_rows())
    assert list(table.columns) == ["colour", "stripes", "Avg. seen", "size", "Avg. unseen"]
    assert list(table.index) == ["task_arithmetic", "ties_merging", "adamerging_layer_wise"]
    unseen.plot_unseen(_unseen_rows(), tmp_path / "u.png")
    _png(tmp_path / "u.png")


def test_padded_task_vectors_add_zero_rows():
    encoder = nn.Linear(3, 2)
    ft = {k: v + 1 for k, v in encoder.state_dict().items()}
    tvs = unseen.padded_task_vectors(encoder, [ft], extra=2)
    assert tvs.shape == (3, 8) and torch.equal(tvs[0], torch.ones(8)) and not tvs[1:].any()


# ---------------------------------------------------------------------- report
def test_pem_summary_splits_negation_into_target_and_control():
    table = pem.summary(_pem_rows())
    assert list(table.columns) == ["Full fine-tuning", "LoRA"]
    assert table.loc["Negation (negated task)", "LoRA"] == 20.0 and table.loc["Negation (other tasks)", "LoRA"] == 60.0
    assert table.loc["AdaMerging (task-wise)", "Full fine-tuning"] == 85.0


def _analysis_outputs(tmp_path: Path) -> dict[str, str]:
    out = tmp_path / "analysis"
    out.mkdir()
    files = {}
    curves = pd.DataFrame([{"method": m, "lambda": lam, "task": t, "split": s, "accuracy": 50 + 30 * lam - 25 * lam**2}
                           for m in ("task_arithmetic", "ties_merging") for lam in (0.0, 0.3, 0.6, 1.0)
                           for t in TASKS for s in ("val", "test")])
    refs = pd.DataFrame([{"model": "adamerging_layer_wise", "task": t, "accuracy": 62.0} for t in TASKS])
    s = sensitivity.sensitivity_table(curves, refs)
    s.to_parquet(out / "sensitivity.parquet")
    sensitivity.plot_sensitivity(s, out / "sensitivity.png")
    lambdas, entropy = _coefficient_inputs()
    c = coefficients.coefficient_table(lambdas)
    c.to_parquet(out / "coefficients.parquet")
    coefficients.plot_layer_wise(c, out / "layer.png")
    coefficients.plot_task_wise(c, out / "task.png")
    coefficients.plot_entropy(entropy, out / "entropy.png")
    d = distances.l2_distances(_models(tmp_path), {"pretrained": "visual."})
    d.to_parquet(out / "distances.parquet")
    distances.plot_matrix(d, "l2", out / "distances.png", "L2")
    sp = pd.DataFrame({"lambda": [0.1, 0.1, 0.3, 0.3], "task": ["a", "all", "a", "all"], "spearman": [0.9, 0.8, 0.7, 0.6],
                       "pvalue": 0.0, "n": 10})
    sp.to_parquet(out / "spearman.parquet")
    _robustness_rows().to_parquet(out / "robustness.parquet")
    robustness.plot_robustness(_robustness_rows(), out / "robustness.png")
    _unseen_rows().to_parquet(out / "unseen.parquet")
    unseen.plot_unseen(_unseen_rows(), out / "unseen.png")
    _pem_rows().to_parquet(out / "pem.parquet")
    pem.plot(_pem_rows(), out / "pem.png")
    files = {"sensitivity": "sensitivity.parquet", "sensitivity_png": "sensitivity.png",
             "coefficients": "coefficients.parquet", "coefficients_layer_png": "layer.png",
             "coefficients_task_png": "task.png", "entropy_png": "entropy.png", "distances": "distances.parquet",
             "distances_png": "distances.png", "spearman": "spearman.parquet", "robustness": "robustness.parquet",
             "robustness_png": "robustness.png", "unseen": "unseen.parquet", "unseen_png": "unseen.png",
             "pem": "pem.parquet", "pem_png": "pem.png"}
    return {k: str(out / v) for k, v in files.items()}


def test_report_embeds_every_analysis(tmp_path):
    from pipeline.report import analysis_sections

    report_dir = tmp_path / "report"
    report_dir.mkdir()
    md, htm = analysis_sections(_analysis_outputs(tmp_path), report_dir)
    md, htm = "\n".join(md), "\n".join(htm)
    for heading in ("Sensitivity", "Learned merging coefficients", "Distances", "Entropy as a surrogate",
                    "Robustness", "Generalisation to unseen tasks", "Composition of parameter-efficient modules"):
        assert heading in md and heading in htm
    assert htm.count("data:image/png;base64,") == 8  # every figure given
    assert "](../analysis/sensitivity.png)" in md and "base64" not in md
    assert "0.900" in md  # the Spearman coefficients are stated
    assert "unlabeled test images of all tasks" in md


def test_report_renders_in_chromium(tmp_path):
    import shutil

    from pipeline.report import screenshot, write_report

    if not any(shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome")):
        pytest.skip("chromium is not installed")
    evals = tmp_path / "eval.parquet"
    pd.DataFrame([{"model": m, "method": m, "task": t, "split": "test", "accuracy": 60.0 + i, "n": 10, "seconds": 0.1}
                  for i, m in enumerate(["zeroshot", "individual", "task_arithmetic"]) for t in TASKS]).to_parquet(evals)
    zoo = {"name": "tiny", "source": "synthetic", "arch": "synth-vit-tiny", "tasks": TASKS, "heldout_tasks": []}
    report_dir = tmp_path / "report"
    report_dir.mkdir()
    html_path = report_dir / "report.html"
    write_report([str(evals)], {"zoo": zoo}, [], zoo, report_dir / "report.md", html_path,
                 report_dir / "table.parquet", _analysis_outputs(tmp_path))
    assert screenshot(html_path, tmp_path / "shot.png", height=1600)
    from PIL import Image

    with Image.open(tmp_path / "shot.png") as im:
        assert im.size == (1200, 1600)
        assert len(im.convert("L").resize((60, 80)).getcolors(256)) > 10  # not a blank page
