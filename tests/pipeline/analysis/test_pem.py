"""Composition of parameter-efficient modules: the summary table."""
from helpers.analysis import _pem_rows

from pipeline.analysis import pem


def test_pem_summary_splits_negation_into_target_and_control():
    table = pem.summary(_pem_rows())
    assert list(table.columns) == ["Full fine-tuning", "LoRA"]
    assert table.loc["Negation (negated task)", "LoRA"] == 20.0 and table.loc["Negation (other tasks)", "LoRA"] == 60.0
    assert table.loc["AdaMerging (task-wise)", "Full fine-tuning"] == 85.0
