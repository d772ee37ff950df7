"""The lambda-sensitivity table and figure."""
import pandas as pd
import pytest
from helpers.analysis import TASKS, _png

from pipeline.analysis import sensitivity


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
