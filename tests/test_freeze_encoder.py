"""config.freeze_encoder (the linear probe): only the head trains, BatchNorm stays as it was."""

import functools

import jax
import numpy as np
import pytest

from cscl_jax import models
from cscl_jax import steps
from configs import test as test_config


def _state_and_batch(name: str, stage: str, freeze: bool):
  config = test_config.get_config()
  config.model.name, config.model.stage, config.freeze_encoder = name, stage, freeze
  model = models.create_model(config.model, axis_name="batch")
  state = steps.create_train_state(jax.random.key(0, impl="rbg"), config, model,
                                   steps.learning_rate_schedule(config, 10))
  m, rng = config.model, np.random.default_rng(0)
  batch = {"inputs": rng.normal(size=(1, 2, m.max_seq_len, m.img_res, m.img_res,
                                      m.num_channels)).astype(np.float32),
           "labels": rng.integers(0, m.num_classes, (1, 2, m.img_res, m.img_res)),
           "valid": np.ones((1, 2, m.img_res, m.img_res), bool)}
  return config, state, batch


def _step(config, state, batch):
  step = jax.pmap(functools.partial(steps.train_step, config=config, axis_name="batch"),
                  axis_name="batch", devices=jax.devices()[:1])
  new, _ = step(jax.tree.map(lambda x: np.stack([x]), state), batch)
  return jax.tree.map(lambda x: np.asarray(x[0]), new)


def test_frozen_encoder_keeps_params_and_batch_stats_head_trains():
  config, state, batch = _state_and_batch("unet3df", "supervised", True)
  new = _step(config, state, batch)
  jax.tree.map(np.testing.assert_array_equal, new.params["encoder"], state.params["encoder"])
  jax.tree.map(np.testing.assert_array_equal, new.batch_stats, state.batch_stats)
  assert any(np.abs(a - b).max() > 0 for a, b in zip(
      jax.tree.leaves(new.params["head"]), jax.tree.leaves(state.params["head"])))
  # Without the flag the same step moves the encoder and its running statistics.
  config, state, batch = _state_and_batch("unet3df", "supervised", False)
  new = _step(config, state, batch)
  for tree in ("params", "batch_stats"):
    old_leaves = jax.tree.leaves(getattr(state, tree)["encoder"])
    assert any(np.abs(a - b).max() > 0 for a, b in zip(
        jax.tree.leaves(getattr(new, tree)["encoder"]), old_leaves)), tree


def test_freezing_an_encoder_without_head_is_refused():
  with pytest.raises(ValueError, match="no head"):
    _state_and_batch("unet3d", "supervised", True)
