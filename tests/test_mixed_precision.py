"""bfloat16 mixed precision (config.dtype): bf16 activations, float32 state and losses.

The tiny model of configs/test.py takes one `steps.train_step` on one device in float32 and
in bfloat16 from the same initial parameters: the losses must agree within bfloat16's
precision, and the bf16 step must leave finite float32 parameters, optimizer state and
BatchNorm statistics.
"""

import functools

import jax
from jax.sharding import Mesh, PartitionSpec as P
import numpy as np
import pytest

from cscl_jax import models
from cscl_jax import steps
from configs import test as test_config

# bfloat16 keeps 8 significant bits (relative rounding 2^-9 = 0.2%); through the tiny
# network the similarities (in [-1, 1]) move by up to ~0.02, but the losses, means of
# O(1) terms over the batch, moved by < 2.5e-4 (pretrain 0.01095 vs 0.01101, finetune
# cross-entropy 2.5001 vs 2.5003) and the gradient norms by ~1%. Tolerances: ~5x those.
LOSS_ATOL, GRAD_NORM_RTOL = 1e-3, 0.05


def _batch(config, batch_size: int = 4):
  m, rng = config.model, np.random.default_rng(0)
  hw = (batch_size, m.img_res, m.img_res)  # [b, H, W]
  labels = np.repeat(np.repeat(rng.integers(0, m.num_classes, hw[:1] + (2, 2)),
                               m.img_res // 2, 1), m.img_res // 2, 2)
  return {"inputs": rng.normal(size=hw[:1] + (m.max_seq_len,) + hw[1:] + (m.num_channels,)
                               ).astype(np.float32),
          "labels": labels.astype(np.int32), "valid": np.ones(hw, bool)}


def _one_step(stage: str, dtype: str):
  """(state before, state after, metrics) of one train step on one device."""
  config = test_config.get_config()
  config.model.stage, config.dtype = stage, dtype
  model = models.create_model(config.model, dtype=config.dtype, axis_name=steps.AXIS)
  state = steps.create_train_state(jax.random.key(0, impl="rbg"), config, model,
                                   steps.learning_rate_schedule(config, 10))
  mesh = Mesh(np.array(jax.devices()[:1]), (steps.AXIS,))
  step = jax.jit(jax.shard_map(
      functools.partial(steps.train_step, config=config, axis_name=steps.AXIS), mesh=mesh,
      in_specs=(P(), P(steps.AXIS)), out_specs=P()))
  batch = _batch(config)
  # Tiny arrays: compilation dominates, so skip XLA's backend optimisations.
  step = step.lower(state, batch).compile({"xla_backend_optimization_level": 0})
  return state, jax.device_get(step(state, batch))


@pytest.mark.parametrize("stage", ["pretrain", "finetune"])
def test_bfloat16_step_matches_float32_and_keeps_float32_state(stage):
  start32, (after32, metrics32) = _one_step(stage, "float32")
  start16, (after16, metrics16) = _one_step(stage, "bfloat16")
  # Same float32 initial parameters whatever the computation dtype.
  jax.tree.map(np.testing.assert_array_equal, start32.params, start16.params)
  assert metrics16["loss"].dtype == np.float32
  assert metrics16["loss"] == pytest.approx(metrics32["loss"], abs=LOSS_ATOL)
  assert metrics16["grad_norm"] == pytest.approx(metrics32["grad_norm"], rel=GRAD_NORM_RTOL)
  state = {"params": after16.params, "batch_stats": after16.batch_stats,
           "opt_state": after16.opt_state}
  for path, leaf in jax.tree_util.tree_leaves_with_path(state):
    if np.issubdtype(leaf.dtype, np.floating):
      assert leaf.dtype == np.float32, jax.tree_util.keystr(path)
      assert np.isfinite(leaf).all(), jax.tree_util.keystr(path)
  changed = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(start16.params),
                                                      jax.tree.leaves(after16.params))]
  assert np.mean(changed) > 0.9  # the step did update (almost) every parameter
