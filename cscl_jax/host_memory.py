"""Keeping freed host memory for reuse, so that CPU training steps do not page-fault.

XLA:CPU allocates every step's temporaries with malloc and frees them when the step
ends. glibc hands blocks over 32 MiB straight back to the kernel (munmap), so the next
step faults all of them in again, page by page, each page zeroed by the kernel: for
UNet3Df at the reference shape (SPEC.md §2) 3.2 GB a step, 820,000 page faults and 1.9 s
of kernel time in an 8.2 s step on 2 cores (benchmarks/README.md). Kept in the heap
instead, the same memory is reused by the next step.

`retain_freed_memory` sets three glibc malloc options (mallopt(3)) for the process:
no mmap for large blocks (M_MMAP_MAX = 0), no trimming of the heap's free top
(M_TRIM_THRESHOLD = SIZE_MAX) and one arena for every thread (M_ARENA_MAX = 1: a thread
that joins later would otherwise get an arena of its own, whose large blocks glibc maps
and unmaps anyway). The process's resident memory then stays at its peak. It must run
before JAX starts its CPU client (its worker threads pick their arena on their first
allocation); the entry points call it first thing.

It is only applied where JAX computes on the CPU (an accelerator's memory is not
malloc's, and a TPU host's many input threads would queue on one arena): when
JAX_PLATFORMS starts with "cpu", or when it is unset and neither libtpu nor a JAX
accelerator plugin (jax_plugins entry points, e.g. jax-cuda12-plugin) is installed.
Elsewhere, and where the C library is not glibc, it does nothing.
"""

import ctypes
import ctypes.util
import importlib.metadata
import importlib.util
import os

# mallopt(3) parameters, glibc's <malloc.h>.
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8


def computes_on_cpu() -> bool:
  """Whether JAX will run on the CPU, decided without starting any JAX backend."""
  platforms = os.environ.get("JAX_PLATFORMS", "")
  if platforms:
    return platforms.split(",")[0].strip() == "cpu"
  has_plugin = bool(importlib.metadata.entry_points(group="jax_plugins"))
  return not has_plugin and importlib.util.find_spec("libtpu") is None


def retain_freed_memory() -> bool:
  """Makes glibc keep freed memory for reuse, where JAX runs on the CPU.

  Returns:
    True if the options were set; False if not applicable (an accelerator, or no glibc).
  """
  if not computes_on_cpu():
    return False
  name = ctypes.util.find_library("c")
  try:
    libc = ctypes.CDLL(name)
    mallopt = libc.mallopt
    libc.gnu_get_libc_version  # Only glibc has both; musl's mallopt does nothing.
  except (OSError, AttributeError, TypeError):
    return False
  mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
  # -1 is SIZE_MAX for M_TRIM_THRESHOLD: glibc stores the int as a size_t.
  return all(mallopt(option, value) == 1 for option, value in (
      (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1), (_M_ARENA_MAX, 1)))
