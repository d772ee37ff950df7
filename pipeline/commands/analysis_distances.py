"""The ``analysis-distances`` verb: L2 distances between encoders, cosine of task vectors."""

from __future__ import annotations

from pipeline.analysis.common import write_parquet
from pipeline.analysis.distances import cosine_matrix, l2_distances, plot_matrix
from pipeline.commands.loading import open_store


def analysis_distances(zoo: dict, pretrained: str, task_vectors: list[str], models: list[str], out: str,
                       figure: str, cosine_out: str, cosine_figure: str) -> None:
    """L2 distances between the pretrained encoder and ``models`` (NAME=PATH) and the cosine
    similarity of the task vectors."""
    dist = l2_distances({"pretrained": pretrained} | dict(m.split("=", 1) for m in models), {"pretrained": "visual."})
    write_parquet(dist, out)
    plot_matrix(dist, "l2", figure, "L2 distance between image encoders")
    cos = cosine_matrix(open_store(zoo, pretrained, task_vectors)[2])
    write_parquet(cos, cosine_out)
    off = cos.loc[cos["a"] != cos["b"], "cosine"].abs()
    vmax = float(off.max()) if len(off) else 1.0
    plot_matrix(cos, "cosine", cosine_figure, "Cosine similarity of task vectors", cmap="RdBu_r", fmt="{:.2f}",
                vmin=-vmax, vmax=vmax)
