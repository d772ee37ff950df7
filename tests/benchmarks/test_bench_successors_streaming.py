"""benchmarks/bench_successors_streaming.py runs every method at a tiny size (peers skipped where
fusion_bench is missing) and its DARE statistics see an unbiased drop."""
import json
import sys

import torch
from helpers.workflow import REPO


def test_successors_benchmark_runs_at_a_tiny_size(tmp_path, monkeypatch):
    sys.path.insert(0, str(REPO))
    from benchmarks import bench_successors_streaming as bench

    g = torch.Generator().manual_seed(0)
    monkeypatch.setattr(bench, "encoder_state", lambda model: {"w": torch.randn(300, 40, generator=g),
                                                                "b": torch.randn(40, generator=g)})
    monkeypatch.setattr(sys, "argv", ["bench", "--tasks", "3", "--workdir", str(tmp_path), "--json",
                                      str(tmp_path / "out.json")])
    bench.main()
    res = json.loads((tmp_path / "out.json").read_text())
    assert list(res["methods"]) == list(bench.SETTINGS)
    z = res["methods"]["dare"]["ours_z"]
    assert abs(z["z_mean"]) < 0.1 and 0.8 < z["z2_mean"] < 1.2
    for method in ("tall_masks", "emr_merging"):
        assert res["methods"][method]["ours"]["storage"]["fraction_of_full_models"] < 0.5
