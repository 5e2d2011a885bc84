"""dpo_ray.allocator: freed activation-sized blocks go back to the system (glibc), measured in fresh
processes."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt: Linux only")

# A step's pattern in miniature: one large block freed (glibc's dynamic threshold rises to its size), then
# several activation-sized blocks, a small allocation made after them, and the blocks freed. Prints the MiB
# still resident over the baseline.
CHILD = r"""
import os, sys
fix = sys.argv[1] == "fix"
if fix:
    from dpo_ray.allocator import return_freed_memory
    assert return_freed_memory()
page = os.sysconf("SC_PAGE_SIZE")
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * page / 2**20
big = bytearray(24 << 20)
del big
base = rss()
blocks = [bytearray(6 << 20) for _ in range(7)]  # 42 MiB, written (bytearray zero-fills: resident)
pin = bytearray(64 << 10)  # allocated after them: the heap's top stays in use
del blocks
print(round(rss() - base, 1))
"""


def _held_mib(mode: str) -> float:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    r = subprocess.run([sys.executable, "-c", CHILD, mode], capture_output=True, text=True, env=env,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    return float(r.stdout.split()[-1])


def test_freed_blocks_return_to_the_system_with_the_fixed_threshold():
    held_default, held_fixed = _held_mib("default"), _held_mib("fix")
    assert held_default >= 30, f"glibc's default kept only {held_default} MiB: the probe shows nothing here"
    assert held_fixed < 8, f"{held_fixed} MiB still resident after freeing 42 MiB"


def test_the_users_malloc_setting_stands():
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(64 << 20)}
    code = ("import dpo_ray.allocator as a; assert a.return_freed_memory(); "
            "assert a.return_freed_memory() is True")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    # with the user's 64 MiB threshold glibc keeps the blocks, as it was told: dpo_ray did not override it
    r = subprocess.run([sys.executable, "-c", CHILD, "fix"], env=env, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    assert float(r.stdout.split()[-1]) >= 30
