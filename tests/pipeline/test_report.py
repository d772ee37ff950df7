"""The report's analysis sections on tiny synthetic inputs (with a chromium screenshot when
chromium is installed)."""

from pathlib import Path

import pandas as pd
import pytest
from helpers.analysis import TASKS, _coefficient_inputs, _models, _pem_rows, _robustness_rows, _unseen_rows

from pipeline.analysis import coefficients, distances, pem, robustness, sensitivity, unseen


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


def test_report_states_the_test_time_methods(tmp_path):
    """Surgery's gain over its base merge and what each method adds; WEMoE's routing weights."""
    import json

    from pipeline.analysis.routing import plot_routing
    from pipeline.report import analysis_sections

    (tmp_path / "surgery.json").write_text(json.dumps({"method": "surgery", "base_method": "adamerging_layer_wise",
                                                       "added_parameters": 4096}))
    (tmp_path / "wemoe.json").write_text(json.dumps({"method": "wemoe", "added_parameters": 123456}))
    routing = pd.DataFrame([{"task": t, "block": b, "expert": e, "weight": 0.6 if t == e else 0.2}
                            for t in TASKS for b in range(3) for e in TASKS])
    routing.to_parquet(tmp_path / "routing.parquet")
    plot_routing(routing, tmp_path / "routing.png")
    main = pd.DataFrame({"Avg.": [70.0, 75.5, 80.0]}, index=["adamerging_layer_wise", "surgery", "wemoe"])
    files = {"surgery_summary": str(tmp_path / "surgery.json"), "wemoe_summary": str(tmp_path / "wemoe.json"),
             "wemoe_routing": str(tmp_path / "routing.parquet"), "wemoe_routing_png": str(tmp_path / "routing.png")}
    md, htm = analysis_sections(files, tmp_path, main)
    md = "\n".join(md)
    assert "Test-time successors of AdaMerging" in md
    surgery_row = next(line for line in md.splitlines() if line.startswith("| Representation Surgery"))
    assert "Layer-wise AdaMerging" in surgery_row and "4,096" in surgery_row and "5.5" in surgery_row
    assert "123,456" in md and "0.600" in md and "0.200" in md
    assert "\n".join(htm).count("data:image/png;base64,") == 1
