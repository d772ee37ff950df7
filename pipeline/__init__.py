"""Adaptive model merging (AdaMerging) pipeline: models, data, merging, evaluation, report."""

__version__ = "0.1.0"
