"""Chunked on-disk stores of derived model data (the zarr task-vector store)."""
