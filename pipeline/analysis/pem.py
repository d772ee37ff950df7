"""Composition of parameter-efficient modules (the paper's PEM experiment): LoRA task updates
(:mod:`pipeline.zoo.lora`) against full fine-tuning task vectors, each composed

* individually (pretrained + the task's own update, on its task),
* by addition (Task Arithmetic, lambda chosen on the validation split from the grid),
* by negation (pretrained + lam * update with lam < 0: accuracy on the negated task, and on
  the other tasks as the control),
* by AdaMerging over the updates (coefficients learned from unlabeled test images).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import pandas as pd
import torch

from pipeline.analysis.common import figure, save_figure

COLUMNS = ["update", "method", "task", "role", "accuracy", "lam"]
UPDATES = {"full": "Full fine-tuning", "lora": "LoRA"}
METHODS = {"individual": "Individual", "addition": "Addition (Task Arithmetic)",
           "negation": "Negation (negated task)", "negation_control": "Negation (other tasks)",
           "adamerging": "AdaMerging (task-wise)"}


def compose(update: str, encoder: torch.nn.Module, pretrained: dict[str, torch.Tensor],
            vectors: Sequence[dict[str, torch.Tensor]], tasks: Sequence[str], heads: Sequence[torch.Tensor],
            val: Sequence, test: Sequence, lambdas: Sequence[float], negation_lam: float, adamerging_settings,
            images: Sequence[torch.Tensor], batch_size: int) -> list[dict]:
    """Rows of :data:`COLUMNS` for one kind of update (``vectors``: one task vector per task)."""
    from pipeline.evaluation import accuracy
    from pipeline.functional import FlatLayout
    from pipeline.merging.adamerging import adamerge
    from pipeline.merging.contract import apply_vector
    from pipeline.merging.lambda_search import search

    def evaluate(state: dict, method: str, which: Sequence[int], role, lam) -> list[dict]:
        encoder.load_state_dict(state)
        return [{"update": update, "method": method, "task": tasks[i], "role": role(i),
                 "accuracy": accuracy(encoder, heads[i], test[i], batch_size, desc=f"{update} {method} {tasks[i]}")["accuracy"],
                 "lam": lam} for i in which]

    every = range(len(tasks))
    rows = []
    for i in every:
        rows += evaluate(apply_vector(pretrained, vectors[i], 1.0), "individual", [i], lambda _: "target", 1.0)
    summed = {k: sum(v[k] for v in vectors) for k in vectors[0]}
    _, best = search(encoder, pretrained, summed, lambdas, list(zip(tasks, heads, val)), f"{update} addition", batch_size)
    rows += evaluate(apply_vector(pretrained, summed, best), "addition", every, lambda _: "all", best)
    for i in every:
        rows += evaluate(apply_vector(pretrained, vectors[i], negation_lam), "negation", every,
                         lambda j, i=i: "target" if j == i else "control", negation_lam)
    layout = FlatLayout.of(pretrained)
    tvs = torch.stack([layout.flatten(v) for v in vectors])
    encoder.load_state_dict(pretrained)  # adamerge merges onto the encoder's weights: not the last negation's
    result = adamerge("task_wise", encoder, tvs, heads, images, adamerging_settings, device="cpu", progress=False,
                      tasks=tasks)
    rows += evaluate(result.state_dict, "adamerging", every, lambda _: "all", None)
    encoder.load_state_dict(pretrained)
    return rows


def summary(rows: pd.DataFrame) -> pd.DataFrame:
    """Average accuracy per method (rows) and kind of update (columns); negation split into
    the negated task and the others."""
    rows = rows.assign(method=rows["method"].where(~((rows["method"] == "negation") & (rows["role"] == "control")),
                                                   "negation_control"))
    table = rows.groupby(["method", "update"])["accuracy"].mean().unstack("update")
    table = table.reindex([m for m in METHODS if m in table.index])
    table.index = [METHODS[m] for m in table.index]
    table.columns = [UPDATES.get(c, c) for c in table.columns]
    return table


def plot(rows: pd.DataFrame, path: str) -> None:
    table = summary(rows)
    fig, ax = figure(figsize=(6.4, 2.8))
    width = 0.8 / len(table.columns)
    for j, col in enumerate(table.columns):
        ax.bar([i + (j - (len(table.columns) - 1) / 2) * width for i in range(len(table))], table[col], width,
               label=col)
    ax.set_xticks(range(len(table)), [t.replace(" (", "\n(") for t in table.index])
    ax.set_ylabel("average accuracy (%)")
    ax.set_ylim(0, 100)
    ax.legend(frameon=False, ncols=2)
    save_figure(fig, path)


def main_table_rows(tasks: Sequence[str], individual: pd.DataFrame, addition: pd.DataFrame, addition_lam: float,
                    negation: Mapping[str, pd.DataFrame], negation_lam: float, adamerging: pd.DataFrame) -> pd.DataFrame:
    """The full fine-tuning rows from the main table's evaluations of the same compositions
    (frames of ``adamerge evaluate``: task, accuracy; ``negation``: negated task -> its
    merge's evaluation on every task), so that both tables show one number per method."""
    def rows(frame: pd.DataFrame, method: str, role, lam) -> list[dict]:
        acc = frame.set_index("task")["accuracy"]
        return [{"update": "full", "method": method, "task": t, "role": role(t), "accuracy": float(acc[t]), "lam": lam}
                for t in tasks]
    out = rows(individual, "individual", lambda _: "target", 1.0)
    out += rows(addition, "addition", lambda _: "all", addition_lam)
    for negated in tasks:
        out += rows(negation[negated], "negation", lambda t, n=negated: "target" if t == n else "control", negation_lam)
    out += rows(adamerging, "adamerging", lambda _: "all", None)
    return pd.DataFrame(out, columns=COLUMNS)


def rows(update: str, encoder: torch.nn.Module, pretrained: dict[str, torch.Tensor], tasks: Sequence[str],
         updates: Sequence[dict[str, torch.Tensor]], test: Sequence[tuple[str, torch.Tensor, object]],
         val: Sequence[object], lambdas: Sequence[float], negation_lam: float, settings, max_images: int,
         batch_size: int) -> pd.DataFrame:
    """The composition rows of one kind of update on ``tasks``: ``update`` "full" (``updates``:
    the fine-tuned state dicts) or "lora" (``updates``: the LoRA factors); ``test``: task, head,
    test split; ``val``: validation splits; ``pretrained``: a copy of ``encoder``'s weights;
    ``settings``: AdaMerging's, on ``max_images`` test images per task (0: all)."""
    from pipeline.analysis.robustness import adaptation_images
    from pipeline.zoo.lora import as_task_vector

    sd = pretrained
    if update == "lora":
        vectors = [as_task_vector(sd, factors) for factors in updates]
    else:
        vectors = [{k: (v.float() - sd[k].float()) for k, v in state.items() if sd[k].is_floating_point()}
                   for state in updates]
    images = adaptation_images([d for _, _, d in test], max_images, settings.seed)
    composed = compose(update, encoder, sd, vectors, tasks, [h for _, h, _ in test], list(val),
                       [d for _, _, d in test], lambdas, negation_lam, settings, images, batch_size)
    return pd.DataFrame(composed, columns=COLUMNS)
