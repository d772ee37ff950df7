"""The one list of merging methods. Each line names a method, its label, its paper, what it
needs and its module's settings and entry point (the contract: :mod:`pipeline.merging.contract`).

The Snakefile derives its rules' method wildcards from here, the CLI checks names against it,
the report takes its labels from it; nothing else lists methods.
"""

from __future__ import annotations

from pipeline.merging import (
    adamerging,
    consensus_ta,
    consensus_ties,
    dare,
    emr_merging,
    fisher_merging,
    iso_merging,
    multitask,
    regmean,
    regmean_plusplus,
    surgery,
    tall_masks,
    task_arithmetic,
    task_negation,
    ties_merging,
    tsv_merging,
    weight_averaging,
    wemoe,
    wudi,
)
from pipeline.merging.contract import Method, Need
from pipeline.merging.streamed import route

STORE = frozenset({Need.TASK_VECTORS})
MODELS_AND_TRAIN = frozenset({Need.MODELS, Need.TRAIN_DATA})
MODELS_AND_TEST = frozenset({Need.MODELS, Need.TEST_DATA})
ADAMERGING = "Yang et al., AdaMerging: Adaptive Model Merging for Multi-Task Learning, ICLR 2024"
ISO = "Marczak et al., No Task Left Behind: Isotropic Model Merging with Common and Task-Specific Subspaces, ICML 2025"
TALL = "Wang et al., Localizing Task Information for Improved Model Merging and Compression, ICML 2024"

_METHODS = [
    Method("weight_averaging", "Weight Averaging", "Wortsman et al., Model soups, ICML 2022", STORE,
           weight_averaging.Settings, weight_averaging.run, table_row=2),
    Method("task_arithmetic", "Task Arithmetic", "Ilharco et al., Editing Models with Task Arithmetic, ICLR 2023",
           STORE, task_arithmetic.Settings, task_arithmetic.run, searched=True, table_row=5),
    Method("ties_merging", "TIES-Merging", "Yadav et al., TIES-Merging, NeurIPS 2023", STORE,
           ties_merging.Settings, ties_merging.run, searched=True, table_row=6),
    Method("fisher_merging", "Fisher Merging", "Matena & Raffel, Merging Models with Fisher-Weighted Averaging, "
           "NeurIPS 2022", MODELS_AND_TRAIN, fisher_merging.Settings, fisher_merging.run, table_row=3),
    Method("regmean", "RegMean", "Jin et al., Dataless Knowledge Fusion by Merging Weights of Language Models, "
           "ICLR 2023", MODELS_AND_TRAIN, regmean.Settings, regmean.run, table_row=4),
    Method("regmean_plusplus", "RegMean++", "Nguyen et al., RegMean++: Enhancing Effectiveness and Generalization "
           "of Regression Mean for Model Merging, 2025", MODELS_AND_TRAIN, regmean_plusplus.Settings,
           regmean_plusplus.run),
    Method("multitask", "Traditional MTL", "joint fine-tuning on all tasks (the AdaMerging paper's upper bound)",
           frozenset({Need.TRAIN_DATA}), multitask.Settings, multitask.run, synthetic_only=True, table_row=1),
    Method("task_negation", "Task Negation", "Ilharco et al., Editing Models with Task Arithmetic, ICLR 2023",
           STORE, task_negation.Settings, task_negation.run, per_task=True),
    Method("tsv_merging", "TSV-M", "Gargiulo et al., Task Singular Vectors: Reducing Task Interference in Model "
           "Merging, CVPR 2025", STORE, tsv_merging.Settings, tsv_merging.run),
    Method("iso_c", "Iso-C", ISO, STORE, iso_merging.IsoCSettings, iso_merging.run_iso_c),
    Method("iso_cts", "Iso-CTS", ISO, STORE, iso_merging.IsoCTSSettings, iso_merging.run_iso_cts),
    Method("wudi", "WUDI-Merging", "Cheng et al., Whoever Started the Interference Should End It: Guiding Data-Free "
           "Model Merging via Task Vectors, ICML 2025", STORE, wudi.Settings, wudi.run),
    Method("dare", "DARE", "Yu et al., Language Models are Super Mario: Absorbing Abilities from Homologous Models "
           "as a Free Lunch, ICML 2024", STORE, dare.Settings, dare.run, searched=True),
    Method("consensus_ta", "Consensus TA", TALL, STORE, consensus_ta.Settings, consensus_ta.run, searched=True),
    Method("consensus_ties", "Consensus TIES", TALL, STORE, consensus_ties.Settings, consensus_ties.run,
           searched=True),
    Method("tall_masks", "TALL Masks", TALL, STORE, tall_masks.Settings, tall_masks.run, route=route),
    Method("emr_merging", "EMR-Merging", "Huang et al., EMR-Merging: Tuning-Free High-Performance Model Merging, "
           "NeurIPS 2024", STORE, emr_merging.Settings, emr_merging.run, route=route),
] + [
    Method(f"adamerging_{variant}", f"{'Layer' if layer_wise else 'Task'}-wise AdaMerging{'++' if plus else ''}",
           ADAMERGING, MODELS_AND_TEST, adamerging.Settings, adamerging.runner(variant),
           table_row=7 + 2 * layer_wise + plus)
    for variant, (layer_wise, plus) in adamerging.VARIANTS.items()
] + [
    Method("wemoe", "WEMoE", "Tang et al., Merging Multi-Task Models via Weight-Ensembling Mixture of Experts, "
           "ICML 2024", MODELS_AND_TEST, wemoe.Settings, wemoe.run, route=wemoe.route),
    Method("surgery", "Representation Surgery", "Yang et al., Representation Surgery for Multi-Task Model Merging, "
           "ICML 2024", MODELS_AND_TEST, surgery.Settings, surgery.run, route=surgery.route),
]

METHODS: dict[str, Method] = {m.name: m for m in _METHODS}


def method(name: str) -> Method:
    """The registry entry of ``name``; an unknown name is refused listing the known ones."""
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown merging method {name!r}; known: {sorted(METHODS)}") from None


def names(needs: frozenset[Need] | None = None, *, searched: bool | None = None, per_task: bool = False,
          synthetic: bool = True) -> list[str]:
    """Names in registry order of the methods that need exactly ``needs`` (any when None),
    are (not) ``searched``, are per task or not, and run on synthetic (or real) zoos."""
    return [m.name for m in _METHODS
            if (needs is None or m.needs == needs) and (searched is None or m.searched == searched)
            and m.per_task == per_task and (synthetic or not m.synthetic_only)]


def table_rows() -> list[str]:
    """Method names in the order of the AdaMerging paper's Table 1, then the others."""
    return sorted(METHODS, key=lambda n: (METHODS[n].table_row is None, METHODS[n].table_row or 0))


def adamerging_variant(name: str) -> str:
    """``adamerging_layer_wise`` -> ``layer_wise``."""
    return name.removeprefix("adamerging_")


def adamerging_variants() -> list[str]:
    """The AdaMerging variants in registry order (the methods of the ``adamerging`` rules)."""
    return [adamerging_variant(m.name) for m in _METHODS if m.run.__module__ == adamerging.__name__]


def test_time_methods(synthetic: bool = True) -> list[str]:
    """Methods learned on unlabeled test images other than AdaMerging (the test_time rules)."""
    return [m for m in names(synthetic=synthetic)
            if Need.TEST_DATA in METHODS[m].needs and METHODS[m].run.__module__ != adamerging.__name__]
