"""The method registry: one entry per method, each with a typed settings dataclass whose
defaults construct, an entry point, and names that the config and the CLI can refuse."""

import dataclasses

import pytest

from pipeline.merging import registry
from pipeline.merging.contract import Need


def test_every_entry_is_complete():
    assert len(registry.METHODS) == len({m.label for m in registry.METHODS.values()})  # labels tell them apart
    for name, spec in registry.METHODS.items():
        assert spec.name == name and spec.paper and spec.needs <= set(Need) and spec.needs
        assert dataclasses.is_dataclass(spec.settings), name
        spec.configure()  # every default constructs
        assert callable(spec.run) and spec.run.__module__.startswith("pipeline.merging."), name
        if spec.searched:
            assert "lam" in {f.name for f in dataclasses.fields(spec.settings)}, name


def test_unknown_names_and_settings_are_refused_naming_them():
    with pytest.raises(ValueError, match="unknown merging method 'dare_ties'.*weight_averaging"):
        registry.method("dare_ties")
    with pytest.raises(ValueError, match=r"ties_merging: unknown settings \['kk'\]; known: \['count_over', 'k', 'lam', 'merge'\]"):
        registry.method("ties_merging").configure({"kk": 20})
    with pytest.raises(ValueError, match="percentage"):
        registry.method("ties_merging").configure(k=120)


def test_lists_the_workflow_derives():
    """Each list holds exactly the methods with its properties (so a new method joins the
    right rules without a test change), the paper's methods included."""
    specs = registry.METHODS.values()
    assert set(registry.names(registry.STORE, searched=False)) == {
        m.name for m in specs if m.needs == registry.STORE and not m.searched and not m.per_task} >= {"weight_averaging"}
    assert set(registry.names(searched=True)) == {m.name for m in specs if m.searched} >= {"task_arithmetic",
                                                                                           "ties_merging"}
    assert set(registry.names(registry.MODELS_AND_TRAIN)) >= {"fisher_merging", "regmean"}
    assert "multitask" in registry.names() and "multitask" not in registry.names(synthetic=False)
    assert registry.names(per_task=True) == ["task_negation"]
    variants = registry.adamerging_variants()
    assert variants == ["task_wise", "layer_wise", "task_wise_plus", "layer_wise_plus"]
    assert registry.test_time_methods() == ["wemoe", "surgery"]
    assert all(registry.method(m).route is not None for m in registry.test_time_methods())


def test_table_rows_follow_the_papers_table_1():
    assert registry.table_rows()[:10] == [
        "multitask", "weight_averaging", "fisher_merging", "regmean", "task_arithmetic", "ties_merging",
        "adamerging_task_wise", "adamerging_task_wise_plus", "adamerging_layer_wise", "adamerging_layer_wise_plus"]
    assert registry.method("adamerging_layer_wise_plus").label == "Layer-wise AdaMerging++"
