"""config.freeze_encoder (the linear probe): only the head trains, BatchNorm stays as it was."""

import functools

import jax
import numpy as np
import optax
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
  """One train step on one device: the new state and the step's metrics."""
  step = jax.pmap(functools.partial(steps.train_step, config=config, axis_name="batch"),
                  axis_name="batch", devices=jax.devices()[:1])
  new, metrics = step(jax.tree.map(lambda x: np.stack([x]), state), batch)
  return jax.tree.map(lambda x: np.asarray(x[0]), (new, metrics))


def test_frozen_encoder_keeps_params_and_batch_stats_head_trains():
  config, state, batch = _state_and_batch("unet3df", "supervised", True)
  new, _ = _step(config, state, batch)
  jax.tree.map(np.testing.assert_array_equal, new.params["encoder"], state.params["encoder"])
  jax.tree.map(np.testing.assert_array_equal, new.batch_stats, state.batch_stats)
  assert any(np.abs(a - b).max() > 0 for a, b in zip(
      jax.tree.leaves(new.params["head"]), jax.tree.leaves(state.params["head"])))
  # Without the flag the same step moves the encoder and its running statistics.
  config, state, batch = _state_and_batch("unet3df", "supervised", False)
  new, _ = _step(config, state, batch)
  for tree in ("params", "batch_stats"):
    old_leaves = jax.tree.leaves(getattr(state, tree)["encoder"])
    assert any(np.abs(a - b).max() > 0 for a, b in zip(
        jax.tree.leaves(getattr(new, tree)["encoder"]), old_leaves)), tree


def test_frozen_step_differentiates_the_head_only():
  """The step's gradient (and so grad_norm) is the head's: no backward pass through the
  frozen encoder, and the head's gradient is the one of the unfrozen network."""
  config, state, batch = _state_and_batch("unet3df", "supervised", True)

  def head_gradient_norm(params, batch):  # Independent: the full gradient, encoder frozen.
    def loss(params):
      out = state.apply_fn({"params": params, "batch_stats": state.batch_stats},
                           batch["inputs"], train=False)
      return steps.compute_loss(out, batch, config, "batch")[0]
    grads = jax.grad(loss)(params)
    return optax.tree.norm(grads["head"]), optax.tree.norm(grads["encoder"])

  head_norm, encoder_norm = jax.pmap(head_gradient_norm, axis_name="batch",
                                     devices=jax.devices()[:1])(
      jax.tree.map(lambda x: np.stack([x]), state.params), batch)
  _, metrics = _step(config, state, batch)
  assert encoder_norm[0] > 0
  np.testing.assert_allclose(metrics["grad_norm"], head_norm[0], rtol=1e-5)


def test_freezing_an_encoder_without_head_is_refused():
  with pytest.raises(ValueError, match="no head"):
    _state_and_batch("unet3d", "supervised", True)
