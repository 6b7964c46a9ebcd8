"""Timing and memory helpers shared by the benchmark scripts."""

import time
from typing import Any, Callable

import jax
import numpy as np


def compiled_bytes(compiled: Any) -> int:
  """XLA's memory of a compiled program: temp + argument + output bytes (peak bound)."""
  memory = compiled.memory_analysis()
  return (memory.temp_size_in_bytes + memory.argument_size_in_bytes
          + memory.output_size_in_bytes)


def median_times(steps: dict[str, Callable[..., Any]], args: tuple,
                 repeats: int) -> dict[str, float]:
  """Median seconds per call of each step on args, after one warm-up round.

  The steps take turns, so load changes on a shared machine hit all of them alike.
  """
  times = {name: [] for name in steps}
  for _ in range(repeats + 1):  # the first round is the warm-up
    for name, step in steps.items():
      start = time.perf_counter()
      jax.block_until_ready(step(*args))
      times[name].append(time.perf_counter() - start)
  return {name: float(np.median(t[1:])) for name, t in times.items()}
