"""The paper's claims computed from a run's tables: each verdict follows the numbers given, a
failing claim reads "does not hold", a missing analysis "not measured"."""
import pandas as pd
import pytest
from helpers.analysis import TASKS, _coefficient_inputs, _robustness_rows, _unseen_rows

from pipeline.analysis import claims, coefficients

PAPER_ORDER = dict(claims.TABLE1)  # averages in the paper's order: every Table 1 claim holds


def verdicts(table: pd.DataFrame) -> dict[str, str]:
    return dict(zip(table["claim"], table["verdict"]))


def test_table1_ordering_follows_the_averages_given():
    ok = verdicts(claims.claims_table(PAPER_ORDER, {}))
    assert ok["Layer-wise AdaMerging++ above Layer-wise AdaMerging"] == claims.HOLDS
    assert ok["Fisher Merging above Weight Averaging"] == claims.HOLDS
    assert ok["Weight Averaging above Zero-shot"] == claims.HOLDS
    assert set(ok.values()) == {claims.HOLDS, claims.MISSING}
    # the demo's Fisher merging below zero-shot, TIES below Task Arithmetic, ++ below plain
    demo = {**PAPER_ORDER, "fisher_merging": 40.0, "ties_merging": 60.0, "adamerging_task_wise_plus": 70.0,
            "adamerging_layer_wise_plus": 79.0}
    got = verdicts(claims.claims_table(demo, {}))
    assert got["Fisher Merging above Weight Averaging"] == claims.FAILS
    assert got["TIES-Merging above RegMean"] == claims.FAILS
    assert got["Task-wise AdaMerging++ >= Task-wise AdaMerging"] == claims.FAILS
    assert got["Layer-wise AdaMerging++ >= Layer-wise AdaMerging"] == claims.FAILS
    assert got["Layer-wise AdaMerging > Task-wise AdaMerging"] == claims.HOLDS
    table = claims.claims_table(demo, {})
    row = table[table["claim"] == "Fisher Merging above Weight Averaging"].iloc[0]
    assert row["paper"] == "68.3 > 65.8 (Table 1)" and row["here"] == "40.0 vs 65.8"
    assert "Fisher Merging above Weight Averaging" in claims.failing(table)
    assert "Layer-wise AdaMerging > Task-wise AdaMerging" not in claims.failing(table)


def test_rows_missing_here_chain_to_the_next_row_present():
    real = {m: v for m, v in PAPER_ORDER.items() if m != "multitask"}  # real zoos have no joint training
    got = verdicts(claims.claims_table(real, {}))
    assert got["Individual above Layer-wise AdaMerging++"] == claims.HOLDS
    assert not any("Traditional MTL" in c for c in got)
    no_plus = {m: v for m, v in PAPER_ORDER.items() if not m.endswith("_plus")}
    assert verdicts(claims.claims_table(no_plus, {}))["Layer-wise AdaMerging++ >= Layer-wise AdaMerging"] \
        == claims.MISSING


def test_missing_analyses_are_not_measured():
    table = claims.claims_table(PAPER_ORDER, {})
    analyses = table[~table["paper"].str.endswith("(Table 1)")]
    assert set(analyses["verdict"]) == {claims.MISSING} and len(analyses) == 5
    assert claims.summary(table).endswith("(5 not measured)")


def test_unseen_claim_compares_each_variant_with_the_best_baseline():
    rows = _unseen_rows()  # accuracy 40 (TA), 41 (layer-wise AdaMerging), 42 (TIES) on every task
    got = verdicts(claims.claims_table({}, {"unseen": rows}))
    assert got["Layer-wise AdaMerging ahead of Task Arithmetic and TIES on unseen tasks"] == claims.FAILS
    rows.loc[rows["method"] == "adamerging_layer_wise", "accuracy"] = 45.0
    got = verdicts(claims.claims_table({}, {"unseen": rows}))
    assert got["Layer-wise AdaMerging ahead of Task Arithmetic and TIES on unseen tasks"] == claims.HOLDS


def test_robustness_claim_per_corruption():
    rows = _robustness_rows()  # accuracy 50 + len(method): AdaMerging (10 letters) below TIES (12)
    got = verdicts(claims.claims_table({}, {"robustness": rows}))
    assert got["AdaMerging ahead under gaussian noise"] == got["AdaMerging ahead under contrast"] == claims.FAILS
    rows.loc[(rows["method"] == "adamerging") & (rows["corruption"] == "contrast"), "accuracy"] = 70.0
    got = verdicts(claims.claims_table({}, {"robustness": rows}))
    assert got["AdaMerging ahead under contrast"] == claims.HOLDS
    assert got["AdaMerging ahead under gaussian noise"] == claims.FAILS
    assert not any("clean" in c for c in got)


@pytest.mark.parametrize("rho, verdict", [(0.4, claims.HOLDS), (-0.1, claims.FAILS)])
def test_surrogate_claim_needs_every_task_positive(rho, verdict):
    sp = pd.DataFrame({"lambda": [0.3] * 3, "task": ["a", "b", "all"], "spearman": [0.8, rho, 0.6],
                       "pvalue": 0.0, "n": 10})
    table = claims.claims_table({}, {"spearman": sp})
    row = table[table["claim"] == "Entropy and loss positively correlated"].iloc[0]
    assert row["verdict"] == verdict and row["here"].startswith("pooled 0.60 at lambda 0.3")


@pytest.mark.parametrize("peak, verdict", [(0.3, claims.HOLDS), (0.4, claims.HOLDS), (0.6, claims.FAILS)])
def test_sensitivity_claim_on_the_test_curve(peak, verdict):
    grid = [0.0, 0.2, 0.3, 0.4, 0.6, 1.0]
    curve = pd.DataFrame([{"kind": "curve", "method": "task_arithmetic", "lambda": lam, "split": split,
                           "accuracy": 80 - 50 * (lam - (peak if split == "test" else 0.3)) ** 2}
                          for lam in grid for split in ("val", "test")])
    got = claims.claims_table({}, {"sensitivity": curve})
    row = got[got["claim"] == "Task Arithmetic best near lambda 0.3"].iloc[0]
    assert row["verdict"] == verdict and row["here"].startswith(f"{peak:g} (test split")


def test_coefficient_claim_compares_deep_and_shallow_blocks():
    lambdas, _ = _coefficient_inputs()
    table = coefficients.coefficient_table(lambdas)  # stem, block 0, block 1, head per layer-wise variant
    claim = "Layer-wise AdaMerging: coefficients larger in deep blocks than in shallow ones"
    deeper = table.assign(value=table["order"] * 0.1)  # growing with depth
    assert verdicts(claims.claims_table({}, {"coefficients": deeper}))[claim] == claims.HOLDS
    shallower = table.assign(value=1.0 / (1 + table["order"]))
    got = claims.claims_table({}, {"coefficients": shallower})
    assert verdicts(got)[claim] == claims.FAILS
    assert got[got["claim"] == claim].iloc[0]["here"] == "deeper half 0.333 vs shallower half 0.500"
    assert set(TASKS) <= set(table["task"]) and (table["group"] == "stem").any()  # stem, head: no blocks
