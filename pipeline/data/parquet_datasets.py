"""Image classification splits stored as parquet (the Hugging Face datasets layout: an image
column of ``{bytes, path}`` structs, or plain binary, and an integer label column), read
lazily one row group at a time."""

from __future__ import annotations

import bisect
import io
from collections.abc import Sequence
from pathlib import Path

import pyarrow.parquet as pq
from PIL import Image
from torch.utils.data import Dataset


class ParquetSplit(Dataset):
    """``(RGB PIL image, int label)`` items of the parquet ``files`` in order. Only the file
    metadata is read up front; an item reads its row group's two columns (the last row group
    read is kept), so memory follows the row group size, not the dataset's."""

    def __init__(self, files: Sequence[str | Path], image_column: str = "image", label_column: str = "label"):
        self.files, self.image_column, self.label_column = [Path(f) for f in files], image_column, label_column
        if not self.files:
            raise ValueError("ParquetSplit needs at least one parquet file")
        self._groups: list[tuple[int, int]] = []  # (file index, row group) in item order
        self._starts: list[int] = []  # index of each row group's first item
        n = 0
        for i, file in enumerate(self.files):
            meta = pq.read_metadata(file)
            columns = meta.schema.to_arrow_schema().names
            missing = [c for c in (image_column, label_column) if c not in columns]
            if missing:
                raise ValueError(f"{file} has no column {missing[0]!r}; its columns: {columns} (set image_column/"
                                 "label_column to the right names)")
            for group in range(meta.num_row_groups):
                if rows := meta.row_group(group).num_rows:
                    self._groups.append((i, group))
                    self._starts.append(n)
                    n += rows
        self._len = n
        self._cached: tuple[int, list, list] | None = None  # (row group index, images, labels)

    def __getstate__(self) -> dict:
        """Pickled (for DataLoader workers) without the cached row group."""
        return self.__dict__ | {"_cached": None}

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, i: int) -> tuple[Image.Image, int]:
        if not -self._len <= i < self._len:
            raise IndexError(f"index {i} out of range for a split of {self._len} items")
        i %= self._len
        g = bisect.bisect_right(self._starts, i) - 1
        images, labels = self._row_group(g)
        row = i - self._starts[g]
        return self._image(images[row], g, row), int(labels[row])

    def _row_group(self, g: int) -> tuple[list, list]:
        if self._cached is None or self._cached[0] != g:
            file, group = self._groups[g]
            table = pq.ParquetFile(self.files[file]).read_row_group(group, columns=[self.image_column,
                                                                                   self.label_column])
            self._cached = (g, table.column(self.image_column).to_pylist(), table.column(self.label_column).to_pylist())
        return self._cached[1], self._cached[2]

    def _image(self, cell, g: int, row: int) -> Image.Image:
        data = cell.get("bytes") if isinstance(cell, dict) else cell
        if not isinstance(data, bytes):
            file, group = self._groups[g]
            raise ValueError(f"{self.files[file]}, row group {group}, row {row}: column {self.image_column!r} holds "
                             f"no image bytes ({type(cell).__name__}); expected binary or a {{bytes, path}} struct")
        return Image.open(io.BytesIO(data)).convert("RGB")
