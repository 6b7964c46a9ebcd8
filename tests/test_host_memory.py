"""Tests for cscl_jax.host_memory: freed memory kept for reuse, on CPU only."""

import subprocess
import sys

import pytest

from cscl_jax import host_memory

# Page faults of a 64 MiB allocation (over glibc's 32 MiB mmap ceiling), made after one
# such allocation was freed; in a fresh process, optionally after retain_freed_memory().
_SCRIPT = """
import resource, sys
import numpy as np
from cscl_jax import host_memory
if sys.argv[1] == "retain":
  assert host_memory.retain_freed_memory()

def faults_of_big_array():
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  a = np.ones(64 << 20, np.uint8)
  del a
  return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

faults_of_big_array()
print(faults_of_big_array())
"""


def _faults(mode: str) -> int:
  out = subprocess.run([sys.executable, "-c", _SCRIPT, mode], check=True, text=True,
                       capture_output=True, env={"JAX_PLATFORMS": "cpu"}).stdout
  return int(out.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc options")
def test_retained_memory_is_reused_without_page_faults():
  returned, retained = _faults("default"), _faults("retain")
  assert returned > 0  # glibc unmapped the first array: the second one faults in anew
  assert retained * 4 < returned


@pytest.mark.parametrize("platforms, on_cpu", [("cpu", True), ("cpu,cuda", True),
                                               ("cuda", False), ("tpu,cpu", False)])
def test_only_applied_where_jax_runs_on_cpu(monkeypatch, platforms, on_cpu):
  monkeypatch.setenv("JAX_PLATFORMS", platforms)
  assert host_memory.computes_on_cpu() == on_cpu
  if not on_cpu:
    assert not host_memory.retain_freed_memory()
