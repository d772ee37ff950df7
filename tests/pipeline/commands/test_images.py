"""The decode-images verb through the CLI on a tiny folder-layout dataset."""
import json

import numpy as np
import torch
from PIL import Image

from pipeline.cli import main
from pipeline.data.image_cache import DecodedImages
from pipeline.data.paper_datasets import classnames
from pipeline.data.tasks import load_split


def test_decode_images_caches_what_the_torchvision_path_gives(tmp_path):
    rng = np.random.default_rng(0)
    for label in range(len(classnames("EuroSAT"))):  # root/EuroSAT/test/<class>/<image>
        folder = tmp_path / "data" / "EuroSAT" / "test" / f"c{label}"
        folder.mkdir(parents=True)
        for j in range(2):
            size = tuple(int(s) for s in rng.integers(20, 90, 2))
            Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(folder / f"{j}.jpg")
    zoo = {"name": "t", "source": "open_clip", "arch": "synth-vit-tiny", "seed": 0, "data_root": str(tmp_path / "data")}
    out = tmp_path / "cache" / "EuroSAT"
    main(["decode-images", "--zoo", json.dumps(zoo), "--task", "EuroSAT", "--split", "test",
          "--out", str(out / "test"), "--threads", "2"])
    cached, decoded = load_split(zoo, "EuroSAT", "test", out), load_split(zoo, "EuroSAT", "test")
    assert isinstance(cached, DecodedImages) and len(cached) == len(decoded) == 20
    for i in range(20):
        (x, y), (xd, yd) = cached[i], decoded[i]
        assert torch.equal(x, xd) and y == yd
    main(["decode-images", "--zoo", json.dumps(zoo), "--task", "EuroSAT", "--split", "test",
          "--out", str(out / "subset"), "--max-images", "5", "--workers", "1"])
    subset = DecodedImages(out / "subset")
    assert len(subset) == 5 and torch.equal(subset[:][0], cached[torch.from_numpy(subset.indices)][0])
