"""Helpers shared by several test modules, one module per area (tests/ is on sys.path, so
``from helpers.merging import merged``). A helper that one test module uses stays in it."""
