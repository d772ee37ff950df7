"""benchmarks/bench_scale.py checks the free disk space before it writes anything."""
import sys

import pytest
from helpers.workflow import REPO


def test_scale_benchmark_checks_disk_space_first(tmp_path):
    sys.path.insert(0, str(REPO))
    from benchmarks.bench_scale import check_disk

    check_disk(tmp_path, 1)
    with pytest.raises(SystemExit, match=r"needs 1000000000.0 GB free in .* pass --workdir on a larger disk"):
        check_disk(tmp_path, 10**18)
