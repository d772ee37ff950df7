"""The learned merging coefficients grouped by block, and their figures."""
import pandas as pd
import pytest
from helpers.analysis import TASKS, _coefficient_inputs, _png

from pipeline.analysis import coefficients


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
