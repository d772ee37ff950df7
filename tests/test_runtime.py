"""retain_freed_memory: a 16 MiB tensor lands on the heap instead of a fresh mapping."""
import json
import os
import subprocess
import sys

import pytest

from pipeline.runtime import MMAP_THRESHOLD, USER_MALLOC_SETTINGS

PROBE = """
import ctypes, json, sys
import torch
from pipeline.runtime import retain_freed_memory

class Mallinfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = Mallinfo2
applied = retain_freed_memory() if sys.argv[1] == "tuned" else None
before = libc.mallinfo2().hblkhd
x = torch.ones(4 << 20)  # 16 MiB
print(json.dumps({"applied": applied, "mapped": libc.mallinfo2().hblkhd - before}))
"""
MIB16 = 16 << 20

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")


def probe(mode: str, **env: str) -> dict:
    clean = {k: v for k, v in os.environ.items() if k not in USER_MALLOC_SETTINGS}
    out = subprocess.run([sys.executable, "-c", PROBE, mode], env={**clean, **env}, check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out.splitlines()[-1])


def test_large_blocks_stay_on_the_heap():
    assert MIB16 < MMAP_THRESHOLD
    assert probe("default")["mapped"] >= MIB16  # glibc's default: a fresh mapping
    tuned = probe("tuned")
    assert tuned["applied"] is True
    assert tuned["mapped"] < MIB16


def test_user_malloc_settings_win():
    result = probe("tuned", MALLOC_TRIM_THRESHOLD_=str(1 << 20))
    assert result["applied"] is False
    assert result["mapped"] >= MIB16
