"""precise_bn: per-batch BatchNorm statistics and their mean, against numpy (8 devices)."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cscl_jax import precise_bn
from cscl_jax import steps
from cscl_jax.models import layers


class TwoNorms(nn.Module):
  """Dense -> BatchNorm "a" -> tanh -> BatchNorm "b", the library's norms."""

  @nn.compact
  def __call__(self, x, *, train):
    norm = functools.partial(layers.batch_norm, train=train, axis_name="batch",
                             dtype=jnp.float32)
    x = norm(name="a")(nn.Dense(3, name="dense")(x))
    return norm(name="b")(jnp.tanh(x))


def _state():
  x = jnp.zeros((1, 4, 4, 5))
  variables = TwoNorms().init(jax.random.key(0), x, train=False)
  return steps.TrainState.create(apply_fn=TwoNorms().apply, params=variables["params"],
                                 tx=optax.sgd(1.0), batch_stats=variables["batch_stats"])


def _numpy_stats(params, x):
  """Every norm's mean and (biased) variance over N, H, W, by plain loops over channels."""
  h = x.astype(np.float64) @ np.asarray(params["dense"]["kernel"]) + np.asarray(
      params["dense"]["bias"])
  stats = {}
  for name in ("a", "b"):
    mean = np.array([h[..., c].mean() for c in range(h.shape[-1])])
    var = np.array([((h[..., c] - mean[c]) ** 2).mean() for c in range(h.shape[-1])])
    stats[name] = {"mean": mean, "var": var}
    scale, bias = np.asarray(params[name]["scale"]), np.asarray(params[name]["bias"])
    h = (h - mean) / np.sqrt(var + layers.NORM_EPSILON) * scale + bias
    h = np.tanh(h) if name == "a" else h
  return stats


def _pmapped(state):
  devices = jax.devices()
  replicated = jax.tree.map(lambda x: np.stack([x] * len(devices)), state)
  step = jax.pmap(functools.partial(precise_bn.batch_statistics, seed=0), axis_name="batch")
  split = lambda x: {"inputs": x.reshape((len(devices), -1) + x.shape[1:])}
  return step, replicated, split


def test_batch_statistics_are_the_global_batch_statistics():
  state = _state()
  # Running statistics far from the batch's: the result must not depend on them.
  state = state.replace(batch_stats=jax.tree.map(lambda s: s + 7.0, state.batch_stats))
  x = np.random.default_rng(0).normal(2.0, 3.0, (16, 4, 4, 5)).astype(np.float32)
  step, replicated, split = _pmapped(state)
  assert jax.device_count() == 8
  got = jax.tree.map(lambda s: np.asarray(s[0]), step(replicated, split(x)))
  want = _numpy_stats(state.params, x)
  jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=2e-5, atol=1e-6),
               got, want)


def test_recompute_is_the_mean_of_the_batches_statistics():
  state = _state()
  rng = np.random.default_rng(1)
  xs = [rng.normal(shift, 1.0 + shift, (8, 4, 4, 5)).astype(np.float32)
        for shift in (0.0, 1.0, 3.0)]
  step, replicated, split = _pmapped(state)
  got = precise_bn.recompute(step, replicated, map(split, xs))
  per_batch = [_numpy_stats(state.params, x) for x in xs]
  want = jax.tree.map(lambda *s: np.mean(s, axis=0), *per_batch)
  jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=2e-5, atol=1e-6),
               jax.tree.map(lambda s: np.asarray(s[0]), got), want)
  with pytest.raises(ValueError, match="No batch"):
    precise_bn.recompute(step, replicated, [])
