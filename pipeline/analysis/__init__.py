"""Analyses of the merged models (docs/architecture.md): each writes a parquet table, then a
matplotlib figure (PNG), which the report embeds.

- :mod:`.sensitivity`: accuracy of Task Arithmetic and TIES over the lambda grid;
- :mod:`.coefficients`: AdaMerging's learned coefficients and entropy curves;
- :mod:`.distances`: L2 distances between models, cosine similarity of task vectors;
- :mod:`.surrogate`: per-sample entropy vs cross-entropy loss, Spearman correlation;
- :mod:`.corruptions` and :mod:`.robustness`: merges under corrupted test distributions;
- :mod:`.unseen`: merges of the seen tasks evaluated on unseen tasks.
"""
