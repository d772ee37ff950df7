"""Composition of parameter-efficient modules: the summary table."""
from helpers.analysis import _pem_rows

from pipeline.analysis import pem


def test_pem_summary_splits_negation_into_target_and_control():
    table = pem.summary(_pem_rows())
    assert list(table.columns) == ["Full fine-tuning", "LoRA"]
    assert table.loc["Negation (negated task)", "LoRA"] == 20.0 and table.loc["Negation (other tasks)", "LoRA"] == 60.0
    assert table.loc["AdaMerging (task-wise)", "Full fine-tuning"] == 85.0


def test_full_update_adamerging_row_is_the_main_tables_task_wise_adamerging():
    """On the full fine-tuning vectors with the main table's settings and images, the PEM
    composition's AdaMerging row is the registry's task-wise AdaMerging: the same number."""
    import torch
    from helpers.adamerging import perturbed_zoo
    from torch.utils.data import TensorDataset

    from pipeline.evaluation import accuracy
    from pipeline.merging import registry
    from pipeline.merging.contract import Inputs

    encoder, pre, finetuned, heads, images = perturbed_zoo()
    tasks = ["a", "b", "c"]
    g = torch.Generator().manual_seed(1)
    test = [TensorDataset(x, torch.randint(0, len(h), (len(x),), generator=g)) for x, h in zip(images, heads)]
    spec = registry.method("adamerging_task_wise")
    settings = spec.configure({"steps": 4, "batch_size": 4})
    vectors = [{k: v.float() - pre[k].float() for k, v in ft.items()} for ft in finetuned]
    rows = pem.compose("full", encoder, pre, vectors, tasks, heads, test, test, [0.3], -1.0, settings, images, 64)
    composed = {r["task"]: r["accuracy"] for r in rows if r["method"] == "adamerging"}
    merged = spec.run(Inputs(pre, tasks, encoder=encoder, finetuned=finetuned, heads=heads, test=images,
                             device="cpu", progress=False), settings).state_dict()
    encoder.load_state_dict(merged)
    main = {t: accuracy(encoder, h, d, 64)["accuracy"] for t, h, d in zip(tasks, heads, test)}
    assert composed == main


def test_full_rows_from_the_main_table_are_used_as_given_and_not_recomputed():
    """With the main table's evaluations, the full fine-tuning rows are those numbers (roles
    and lambdas as the composition writes them) and no full fine-tuning model is built."""
    import pandas as pd

    tasks = ["a", "b"]
    frame = lambda acc: pd.DataFrame({"task": tasks, "accuracy": acc})  # noqa: E731
    rows = pem.main_table_rows(tasks, pd.DataFrame({"task": ["b", "a"], "accuracy": [91.0, 90.0]}),
                               frame([70.0, 60.0]), 0.3, {"a": frame([10.0, 80.0]), "b": frame([75.0, 20.0])},
                               -1.0, frame([72.0, 66.0]))
    table = pem.summary(rows)
    assert table.loc["Individual", "Full fine-tuning"] == 90.5
    assert table.loc["Addition (Task Arithmetic)", "Full fine-tuning"] == 65.0
    assert table.loc["Negation (negated task)", "Full fine-tuning"] == 15.0
    assert table.loc["Negation (other tasks)", "Full fine-tuning"] == 77.5
    assert set(rows.loc[rows["method"] == "addition", "lam"]) == {0.3}
    assert set(rows["update"]) == {"full"} and list(rows.columns) == pem.COLUMNS
