"""benchmarks/bench_scale.py checks the free disk space before it writes anything and runs any
streamed method."""
import json
import sys

import pytest
import torch
from helpers.workflow import REPO


def test_scale_benchmark_checks_disk_space_first(tmp_path):
    sys.path.insert(0, str(REPO))
    from benchmarks.bench_scale import check_disk

    check_disk(tmp_path, 1)
    with pytest.raises(SystemExit, match=r"needs 1000000000.0 GB free in .* pass --workdir on a larger disk"):
        check_disk(tmp_path, 10**18)


@pytest.mark.parametrize("method", ["dare", "consensus_ties", "tall_masks", "emr_merging"])
def test_scale_benchmark_runs_the_streamed_methods(tmp_path, monkeypatch, method):
    """--method runs any streamed method through its registry entry (at a tiny size here);
    the routed ones report their bytes on disk; the TIES twin and peer are refused for them."""
    sys.path.insert(0, str(REPO))
    from benchmarks import bench_scale

    g = torch.Generator().manual_seed(0)
    monkeypatch.setattr(bench_scale, "encoder_state", lambda model: {"w": torch.randn(64, 33, generator=g),
                                                                      "b": torch.randn(33, generator=g)})
    monkeypatch.setattr(bench_scale, "drop_caches", lambda: False)  # never the machine's page cache in a test
    args = ["bench_scale.py", "--tasks", "3", "--workdir", str(tmp_path), "--chunk-mib", "0.001", "--method", method,
            "--json", str(tmp_path / "out.json")]
    monkeypatch.setattr(sys, "argv", args)
    bench_scale.main()
    res = json.loads((tmp_path / "out.json").read_text())
    assert res["method"] == method and res["ours"]["passes"] >= 1 and "ours_vs_twin" not in res
    assert ("storage" in res["ours"]) == (method in ("tall_masks", "emr_merging"))
    monkeypatch.setattr(sys, "argv", [*args, "--peer"])
    with pytest.raises(SystemExit):
        bench_scale.main()
