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
