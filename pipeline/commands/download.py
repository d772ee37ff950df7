"""Verbs that fetch a model or a dataset from the Hugging Face Hub into its cache and write
the manifest (:mod:`pipeline.hub`) that later rules read the snapshot folder from."""

from __future__ import annotations

from pipeline.hub import download, write_manifest


def download_model(repo: str, revision: str, out: str) -> None:
    """Fetch model ``repo`` at ``revision`` (config, weights, tokenizer files) and write its manifest."""
    write_manifest(download(repo, revision, "model"), out)


def download_dataset(repo: str, revision: str, out: str, allow_patterns: tuple[str, ...] = ()) -> None:
    """Fetch dataset ``repo`` at ``revision`` (its parquet files and README.md, or the files
    matching ``allow_patterns``) and write its manifest."""
    write_manifest(download(repo, revision, "dataset", allow_patterns or None), out)
