"""Generalisation to unseen tasks (the paper's Table 4): merge the task vectors of the seen
tasks only and evaluate on the seen and the unseen tasks. As in the paper, AdaMerging learns
its coefficients (of the seen tasks' vectors) by minimising the prediction entropy on the
unlabeled test images of all tasks, the unseen ones included, each through its own head."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch

from pipeline.analysis.common import figure, label, save_figure

COLUMNS = ["method", "task", "group", "accuracy", "n"]


def _evaluate(encoder, state_dict, method: str, splits, unseen: Sequence[str], batch_size: int) -> list[dict]:
    from pipeline.evaluation import accuracy

    encoder.load_state_dict(state_dict)
    rows = []
    for name, head, data in splits:
        r = accuracy(encoder, head, data, batch_size, desc=f"{method} on {name}")
        rows.append({"method": method, "task": name, "group": "unseen" if name in unseen else "seen",
                     "accuracy": r["accuracy"], "n": r["n"]})
    return rows


def run_baselines(encoder: torch.nn.Module, pretrained: dict[str, torch.Tensor], store,
                  splits: Sequence[tuple[str, torch.Tensor, object]], unseen: Sequence[str], lambdas: dict, ties: dict,
                  batch_size: int, budget_mib: float, arch: str | None = None) -> pd.DataFrame:
    """Task Arithmetic and TIES (``ties``: its settings, their ``lam`` replaced by ``lambdas``')
    of the seen tasks' vectors (``store``, streamed within ``budget_mib``) on every task of
    ``splits`` (task, head, test split); ``arch``: the zoo's architecture."""
    from pipeline.merging import task_arithmetic, ties_merging
    from pipeline.merging.contract import Inputs, default_device

    ta = task_arithmetic.Settings(lam=lambdas["task_arithmetic"])
    rows = _evaluate(encoder, task_arithmetic.run(Inputs(pretrained, store.tasks, store, budget_mib=budget_mib),
                                                  ta).state_dict(),
                     "task_arithmetic", splits, unseen, batch_size)
    tm = ties_merging.Settings(**{**ties, "lam": lambdas["ties_merging"]})
    merged = ties_merging.run(Inputs(pretrained, store.tasks, store, device=default_device(), budget_mib=budget_mib,
                                     arch=arch), tm).state_dict()
    rows += _evaluate(encoder, merged, "ties_merging", splits, unseen, batch_size)
    return pd.DataFrame(rows, columns=COLUMNS)


def padded_task_vectors(encoder: torch.nn.Module, finetuned: Sequence[dict], extra: int) -> torch.Tensor:
    """(K + extra, N) task vectors of ``finetuned`` in the encoder's flat layout, followed by
    ``extra`` zero rows: tasks whose head and images take part in the entropy loss but whose
    vector is not merged (a zero vector contributes nothing, and its TIES part is zero)."""
    from pipeline.functional import FlatLayout
    from pipeline.merging.adamerging import task_vector_matrix

    sd = encoder.state_dict()
    layout = FlatLayout.of(sd)
    tvs = task_vector_matrix(layout, layout.flatten(sd), finetuned)
    return torch.cat([tvs, tvs.new_zeros(extra, layout.numel)])


def run_adamerging(encoder: torch.nn.Module, eval_encoder: torch.nn.Module, variant: str, seen: Sequence[str],
                   finetuned: Sequence[dict[str, torch.Tensor]], splits: Sequence[tuple[str, torch.Tensor, object]],
                   unseen: Sequence[str], settings, max_images: int, batch_size: int,
                   arch: str | None = None) -> pd.DataFrame:
    """AdaMerging (``settings``) of the seen tasks' fine-tuned models, adapted with
    ``encoder`` on the unlabeled test images of every task of ``splits`` (task, head, test
    split), evaluated with ``eval_encoder``; ``arch``: the zoo's architecture."""
    from pipeline.analysis.robustness import adaptation_images
    from pipeline.merging.adamerging import adamerge

    by_task = {t: x for t, x in zip([t for t, _, _ in splits], splits)}
    order = list(seen) + [t for t in by_task if t not in seen]  # vectors of the seen tasks first
    ordered = [by_task[t] for t in order]
    tvs = padded_task_vectors(encoder, finetuned, len(order) - len(seen))
    result = adamerge(variant, encoder, tvs, [h for _, h, _ in ordered],
                      adaptation_images([d for _, _, d in ordered], max_images, settings.seed), settings, device=None,
                      progress=False, tasks=order, arch=arch)
    return pd.DataFrame(_evaluate(eval_encoder, result.state_dict, f"adamerging_{variant}", ordered, unseen,
                                  batch_size), columns=COLUMNS)


def unseen_table(rows: pd.DataFrame) -> pd.DataFrame:
    """Rows methods; columns each seen task, "Avg. seen", each unseen task, "Avg. unseen"."""
    wide = rows.pivot_table(index="method", columns="task", values="accuracy", aggfunc="first")
    out = pd.DataFrame(index=wide.index)
    for group in ("seen", "unseen"):
        tasks = list(dict.fromkeys(rows.loc[rows["group"] == group, "task"]))
        for t in tasks:
            out[t] = wide[t]
        out[f"Avg. {group}"] = wide[tasks].mean(axis=1)
    from pipeline.merging import registry

    order = registry.table_rows()
    return out.loc[[m for m in order if m in out.index] + sorted(set(out.index) - set(order))]


def plot_unseen(rows: pd.DataFrame, path) -> None:
    """Average accuracy on the seen and the unseen tasks per method."""
    table = unseen_table(rows)
    fig, ax = figure(figsize=(0.9 * len(table) + 2.5, 3.0))
    x = np.arange(len(table))
    for i, group in enumerate(("seen", "unseen")):
        ax.bar(x + (i - 0.5) * 0.38, table[f"Avg. {group}"], 0.38, label=f"{group} tasks", color=f"C{i}")
    ax.set_xticks(x, [label(m) for m in table.index], rotation=30, ha="right")
    ax.set_ylabel("Average accuracy (%)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(frameon=False)
    save_figure(fig, path)
