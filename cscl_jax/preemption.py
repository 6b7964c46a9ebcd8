"""Requested stops (Ctrl-C, SIGTERM from a scheduler or a pre-empted VM): save, then stop.

The training loop turns the first SIGINT/SIGTERM into a request (`stop_requests`), checks
it after every step (`stop_agreed`: all processes of a multi-host run together), saves a
checkpoint and raises `Stopped`; `cscl_jax.main` logs its one-line message and exits with
the signal's conventional status. A second signal stops at once.
"""

import contextlib
import signal

from absl import logging
import jax
from jax.experimental import multihost_utils
import numpy as np


class Stopped(KeyboardInterrupt):
  """A requested stop (Ctrl-C / SIGTERM): the run saved a checkpoint at `step` and ended.

  `exit_code` is the conventional status of a process ended by the first signal received
  (128 + its number: 130 for Ctrl-C, 143 for SIGTERM).
  """

  def __init__(self, step: int, signals: list[int]):
    super().__init__(f"Stopped at step {step}; saved a checkpoint there. Run the same "
                     "command again to resume.")
    # Processes that stopped because another one was asked to: as if sent SIGTERM.
    self.step, self.exit_code = step, 128 + (signals[0] if signals else signal.SIGTERM)


@contextlib.contextmanager
def stop_requests():
  """Turns a first SIGINT/SIGTERM into a request to save and stop after this step.

  Yields a list that receives the number of the first signal.
  """
  received = []

  def handler(signum, frame):
    del frame
    if received:  # A second signal: stop at once.
      raise KeyboardInterrupt
    logging.warning("%s: saving a checkpoint after this step, then stopping.",
                    signal.Signals(signum).name)
    received.append(signum)

  previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
  try:
    yield received
  finally:
    for s, h in previous.items():
      signal.signal(s, h)


def stop_agreed(requested: bool, step: int, every: int) -> bool:
  """Whether to stop after `step`: at once with one process; with several, all together.

  Each host gets its own SIGTERM, maybe steps apart, and a stop (a collective save) that
  not every process takes deadlocks the run. So processes agree every `every` steps, where
  the loop waits for the devices anyway, and stop when any of them was asked to.
  """
  if jax.process_count() == 1:
    return requested
  if step % every:
    return False
  return bool(np.any(multihost_utils.process_allgather(np.asarray(requested))))
