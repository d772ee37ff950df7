"""Parquet image splits: the images and labels written come back, row group by row group."""

import io
import pickle

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.data.parquet_datasets import ParquetSplit


def images(n: int, seed: int) -> list[Image.Image]:
    """``n`` small images of mixed modes and sizes (RGB, greyscale, RGBA)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        mode, channels = [("RGB", 3), ("L", 1), ("RGBA", 4)][i % 3]
        pixels = rng.integers(0, 256, (5 + i, 7, channels), dtype=np.uint8)
        out.append(Image.fromarray(pixels[..., 0] if channels == 1 else pixels, mode))
    return out


def png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def write(path, imgs, labels, struct: bool = True, row_group_size: int = 3, image_column: str = "image") -> None:
    """A split file the way Hugging Face datasets writes one: {bytes, path} image structs."""
    cells = [{"bytes": png(im), "path": f"{i}.png"} for i, im in enumerate(imgs)] if struct else \
        [png(im) for im in imgs]
    pq.write_table(pa.table({image_column: cells, "label": pa.array(labels, pa.int64())}), path,
                   row_group_size=row_group_size)


def test_images_and_labels_come_back_in_file_order(tmp_path):
    first, second = images(7, 0), images(4, 1)
    write(tmp_path / "test-00000-of-00002.parquet", first, list(range(7)))
    write(tmp_path / "test-00001-of-00002.parquet", second, [9, 8, 7, 6])
    split = ParquetSplit([tmp_path / "test-00000-of-00002.parquet", tmp_path / "test-00001-of-00002.parquet"])
    assert len(split) == 11
    for i, (expected, label) in enumerate(zip(first + second, list(range(7)) + [9, 8, 7, 6], strict=True)):
        image, got = split[i]
        assert image.mode == "RGB" and got == label and type(got) is int
        assert np.array_equal(np.asarray(image), np.asarray(expected.convert("RGB")))
    assert split[-1][1] == 6
    with pytest.raises(IndexError, match="index 11 out of range for a split of 11 items"):
        split[11]


def test_a_plain_binary_column_and_other_column_names(tmp_path):
    imgs = images(2, 2)
    write(tmp_path / "a.parquet", imgs, [1, 0], struct=False, image_column="img")
    split = ParquetSplit([tmp_path / "a.parquet"], image_column="img")
    assert np.array_equal(np.asarray(split[0][0]), np.asarray(imgs[0].convert("RGB"))) and split[1][1] == 0


def test_reads_one_row_group_at_a_time(tmp_path, monkeypatch):
    write(tmp_path / "a.parquet", images(10, 3), list(range(10)), row_group_size=4)
    reads = []
    original = pq.ParquetFile.read_row_group
    monkeypatch.setattr(pq.ParquetFile, "read_row_group",
                        lambda self, i, **kw: reads.append(i) or original(self, i, **kw))
    split = ParquetSplit([tmp_path / "a.parquet"])
    assert len(split) == 10 and reads == []  # the length from the metadata alone
    assert [split[i][1] for i in range(10)] == list(range(10))
    assert reads == [0, 1, 2]
    assert pickle.loads(pickle.dumps(split))._cached is None  # workers get no row group


def test_a_missing_column_names_the_file_and_its_columns(tmp_path):
    write(tmp_path / "a.parquet", images(1, 4), [0], image_column="img")
    with pytest.raises(ValueError, match=r"a\.parquet has no column 'image'; its columns: \['img', 'label'\]"):
        ParquetSplit([tmp_path / "a.parquet"])


def test_a_cell_without_bytes_is_refused(tmp_path):
    cell = {"bytes": None, "path": "elsewhere.png"}
    pq.write_table(pa.table({"image": [cell], "label": [0]}), tmp_path / "a.parquet")
    with pytest.raises(ValueError, match=r"a\.parquet, row group 0, row 0: column 'image' holds no image bytes"):
        ParquetSplit([tmp_path / "a.parquet"])[0]
