"""Precise BatchNorm statistics: recomputed over many training batches before evaluating.

A BatchNorm network evaluates with the running statistics it kept while training, an
exponential average (PyTorch momentum 0.1) of the last ~10 batches' statistics, taken
while the weights moved under them. With small batches (8 crops) they can be far from the
statistics of the final weights: on sits_synthetic a UNet3Df's validation mIoU swung
0.80 -> 0.41 -> 0.69 between neighbouring evaluations while its training loss fell
smoothly, and 0.41 became 0.86 with recomputed statistics (benchmarks/results/).

`recompute` replaces them by the mean, over many training batches, of each
batch's statistics under the current weights ("precise BN", Wu & Johnson 2021, "Rethinking
'Batch' in BatchNorm", §3): mean of the batch means and of the batch variances.
"""

from collections.abc import Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from cscl_jax.models import layers


def batch_statistics(state: Any, batch: dict[str, jax.Array], *, seed: int) -> Any:
  """This batch's BatchNorm statistics: every norm's batch "mean" and "var".

  The model runs in training mode (as `steps.train_step`'s forward pass, dropout
  included) from zeroed running statistics. Every norm is a `layers.batch_norm`, updated
  once a forward pass to momentum * old + (1 - momentum) * batch statistic, so its update
  divided by (1 - momentum) is the batch's statistic. Under pmap / shard_map the norms
  average them over the device axis: the statistics of the global batch.

  Args:
    state: a train state (apply_fn, params, batch_stats, step).
    batch: "inputs" [b, T, H, W, C].
    seed: config.seed (the dropout masks).

  Returns:
    A tree shaped like state.batch_stats.
  """
  zeros = jax.tree.map(jnp.zeros_like, state.batch_stats)
  _, updates = state.apply_fn(
      {"params": state.params, "batch_stats": zeros}, batch["inputs"], train=True,
      mutable=["batch_stats"], rngs={"dropout": jax.random.fold_in(jax.random.key(seed),
                                                                   state.step)})
  return jax.tree.map(lambda u: u / (1 - layers.BN_MOMENTUM), updates["batch_stats"])


def recompute(statistics_step: Any, state: Any,
              batches: Iterable[dict[str, np.ndarray]]) -> Any:
  """The mean of `statistics_step(state, batch)` over `batches`.

  Args:
    statistics_step: `batch_statistics` (seed bound), under `jax.pmap` with the training
      step's axis, or jitted for an unreplicated state.
    state: the (replicated) train state.
    batches: training batches, e.g. the next config.precise_bn_batches of the train split.

  Returns:
    The (replicated) BatchNorm statistics, to replace state.batch_stats.

  Raises:
    ValueError: if `batches` is empty.
  """
  total, count = None, 0
  for batch in batches:
    stats = statistics_step(state, batch)
    total = stats if total is None else jax.tree.map(jnp.add, total, stats)
    count += 1
  if total is None:
    raise ValueError("No batch to recompute the BatchNorm statistics with: the training "
                     "split gave none (check config.dataset.train_split).")
  return jax.tree.map(lambda x: x / count, total)
