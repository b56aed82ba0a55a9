"""app.tune_allocator: body-sized buffers come from the heap, not a fresh mmap each."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(
    platform.libc_ver()[0] != "glibc", reason="mallopt thresholds are glibc's"
)

# A fresh interpreter allocates a 600 KiB buffer and says whether it lies in the heap.
_PROBE = """
import ctypes, sys
from demux_proxy import app
if sys.argv[1] == "tuned":
    assert app.tune_allocator()
buf = bytearray(600 * 1024)
at = ctypes.addressof((ctypes.c_char * len(buf)).from_buffer(buf))
with open("/proc/self/maps") as f:
    for line in f:
        lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
        if lo <= at < hi:
            print("heap" if line.rstrip().endswith("[heap]") else "mapping")
"""


def _where(mode: str) -> str:
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, mode], capture_output=True, text=True, check=True
    )
    return out.stdout.strip()


def test_untuned_glibc_maps_a_body_sized_buffer() -> None:
    # The premise: without tuning, glibc serves 600 KiB with a mapping of its own.
    assert _where("default") == "mapping"


def test_tuned_allocator_serves_it_from_the_heap() -> None:
    assert _where("tuned") == "heap"
